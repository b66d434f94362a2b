"""Heat maps beside the data's path: each scored file's Grad-CAM overlay, drawn and written
by a few threads of their own while the model scores the next batch.

The reporter hands over a batch's (item, prediction, map) triples, the maps on the explained
block's grid from the model's own pass, and gets back, per item, the path its row names:
``<explain.folder>/<LABEL>/<relative path>.png`` (``filing.layout: date/label``:
``<explain.folder>/YYYY-MM-DD/<LABEL>/...``, the UTC day it is written), relative to the
config file's folder. A name already taken is never overwritten (a content hash is added, as
in processed/). Overlays are derived pictures, results.csv is the record: they are written
atomically but not fsynced. A heat map never fails a row: an error is logged
(``heatmap_write_failed``, with the file) and the row gets no path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watcher.explain import overlay_png, write_overlay
from watcher.filing import destination_root, plan_destination

log = structlog.get_logger()


class HeatmapWriter:
    """Draws and writes overlays in ``workers`` threads (OpenCV releases the GIL)."""

    def __init__(self, folder: Path, layout: str, relative_to: Path, workers: int) -> None:
        self.folder = folder
        self.layout = layout
        self.relative_to = relative_to
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="heatmap")

    def write(self, jobs: Sequence[tuple[Any, Any, Any]], threshold: float) -> dict[int, str]:
        """Overlays for ``(item, prediction, map)`` triples; returns ``id(item)`` -> the path
        for its row ('' where none was written). Returns once all are written."""
        paths = self._pool.map(lambda job: self._write_one(job[0], job[1], job[2], threshold), jobs)
        return {id(job[0]): path for job, path in zip(jobs, paths, strict=True)}

    def _write_one(self, item: Any, pred: Any, cam: Any, threshold: float) -> str:
        if cam is None or item.thumb is None:
            return ""
        try:
            root = destination_root(self.folder, pred.label, self.layout, datetime.now(timezone.utc))
            png = overlay_png(item.thumb, cam, pred.label, pred.probability, threshold)
            path = _write_new(root, PurePosixPath(str(item.rel) + ".png"), item.sha256 or "0" * 8, png)
        except Exception as exc:  # never block or fail the row
            log.error("heatmap_write_failed", file=str(item.rel), error=f"{type(exc).__name__}: {exc}")
            return ""
        return os.path.relpath(path, self.relative_to)

    def close(self) -> None:
        """Wait for overlays being written, then stop the threads."""
        self._pool.shutdown(wait=True)


_TRIES = 100


def _write_new(root: Path, rel: PurePosixPath, sha256: str, png: bytes) -> Path:
    """Write ``png`` under ``root`` at ``rel``, or the next free name (``plan_destination``).

    Never replaces a file: two files of the same name in one batch are drawn by two threads
    at once, and both may find the same name free; the second to link it gets the next one.
    """
    for _ in range(_TRIES):
        path = plan_destination(root, rel, sha256)
        try:
            write_overlay(path, png, durable=False, exclusive=True)
        except FileExistsError:
            if not path.parent.is_dir():
                raise  # a file where the folder should be: no other name helps
            continue
        return path
    raise FileExistsError(f"no free name for {rel} under {root} after {_TRIES} tries")
