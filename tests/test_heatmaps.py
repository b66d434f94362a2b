"""The heat-map writer beside the data's path: layout, names never reused, failures that never
cost a row (a real daemon whose heat-map folder cannot be made)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import fixture_images
from tests.harness import read_csv_both, run_once
from watcher.config import Config
from watcher.heatmaps import HeatmapWriter
from watcher.inference import Prediction
from watcher.service import Item, thumbnail


def _item(rel: str, sha: str = "ab" * 32) -> Item:
    image = cv2.imread(str(fixture_images()[0]), cv2.IMREAD_GRAYSCALE)
    return Item(rel=PurePosixPath(rel), path=Path(rel), sha256=sha, thumb=thumbnail(image))


CAM = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
PNEUMONIA = Prediction(0.91, "PNEUMONIA")


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[HeatmapWriter]:
    w = HeatmapWriter(tmp_path / "heatmaps", "label", tmp_path, workers=2)
    yield w
    w.close()


class TestWriter:
    def test_paths_for_the_rows_mirror_the_files(self, writer: HeatmapWriter, tmp_path: Path) -> None:
        """One decodable overlay per job at heatmaps/<LABEL>/<rel>.png, the path relative to the
        config's folder; a job without a map or thumbnail gets none."""
        a, b, none = _item("ward/a.jpeg"), _item("b.jpeg"), _item("c.jpeg")
        none.thumb = None
        got = writer.write(
            [(a, PNEUMONIA, CAM), (b, Prediction(0.1, "NORMAL"), CAM), (none, PNEUMONIA, CAM)], 0.5
        )
        assert {
            id(a): "heatmaps/PNEUMONIA/ward/a.jpeg.png",
            id(b): "heatmaps/NORMAL/b.jpeg.png",
            id(none): "",
        } == got
        for path in (p for p in got.values() if p):
            img = cv2.imread(str(tmp_path / path), cv2.IMREAD_COLOR)
            assert img is not None and img.shape[:2] == a.thumb.shape  # type: ignore[union-attr]

    def test_a_name_taken_is_never_overwritten(self, writer: HeatmapWriter, tmp_path: Path) -> None:
        first = writer.write([(_item("a.jpeg", "11" * 32), PNEUMONIA, CAM)], 0.5)
        before = (tmp_path / next(iter(first.values()))).read_bytes()
        second = writer.write([(_item("a.jpeg", "22" * 32), PNEUMONIA, np.flipud(CAM).copy())], 0.5)
        assert ["heatmaps/PNEUMONIA/a.jpeg.png"] == list(first.values())
        assert ["heatmaps/PNEUMONIA/a.jpeg.22222222.png"] == list(second.values())
        assert before == (tmp_path / "heatmaps/PNEUMONIA/a.jpeg.png").read_bytes()

    def test_two_files_of_one_name_in_a_batch_get_two_heat_maps(self, tmp_path: Path) -> None:
        """Same name, same label, one batch (the daemon claims such pairs): drawn by two threads
        at once, each row still names its own picture, and neither replaces the other."""
        w = HeatmapWriter(tmp_path / "heatmaps", "label", tmp_path, workers=2)
        try:
            for round_ in range(10):  # the threads race for the free name: again and again
                a, b = _item(f"r{round_}/scan.jpeg", "11" * 32), _item(f"r{round_}/scan.jpeg", "22" * 32)
                got = w.write([(a, PNEUMONIA, CAM), (b, PNEUMONIA, np.flipud(CAM).copy())], 0.5)
                plain = f"heatmaps/PNEUMONIA/r{round_}/scan.jpeg.png"
                assert {got[id(a)], got[id(b)]} in (
                    {plain, plain.replace(".png", ".22222222.png")},
                    {plain, plain.replace(".png", ".11111111.png")},
                ), got
                assert got[id(a)] in (plain, plain.replace(".png", ".11111111.png"))  # its own hash
                pictures = [cv2.imread(str(tmp_path / got[id(x)]), cv2.IMREAD_COLOR) for x in (a, b)]
                assert not np.array_equal(pictures[0], pictures[1])  # each its own map
                assert 2 == len(list((tmp_path / "heatmaps/PNEUMONIA" / f"r{round_}").iterdir()))
        finally:
            w.close()

    def test_date_layout(self, tmp_path: Path) -> None:
        w = HeatmapWriter(tmp_path / "hm", "date/label", tmp_path, workers=1)
        try:
            before = datetime.now(timezone.utc).strftime("%Y-%m-%d")
            (path,) = w.write([(_item("a.jpeg"), PNEUMONIA, CAM)], 0.5).values()
            after = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        finally:
            w.close()
        assert path in {f"hm/{day}/PNEUMONIA/a.jpeg.png" for day in (before, after)}

    def test_a_failed_write_is_logged_and_costs_only_its_own_heat_map(self, tmp_path: Path) -> None:
        """A label folder that cannot be made (a file in its place): that job gets '' and an
        error naming the file; the other label's overlay is written."""
        (tmp_path / "heatmaps").mkdir()
        (tmp_path / "heatmaps" / "PNEUMONIA").write_text("in the way")
        w = HeatmapWriter(tmp_path / "heatmaps", "label", tmp_path, workers=2)
        bad, good = _item("ward/bad.jpeg"), _item("good.jpeg")
        try:
            with capture_logs() as logs:
                got = w.write([(bad, PNEUMONIA, CAM), (good, Prediction(0.2, "NORMAL"), CAM)], 0.5)
        finally:
            w.close()
        assert {id(bad): "", id(good): "heatmaps/NORMAL/good.jpeg.png"} == got
        (event,) = [e for e in logs if e["event"] == "heatmap_write_failed"]
        assert "ward/bad.jpeg" == event["file"] and "error" == event["log_level"]


class TestInTheDaemon:
    def test_heat_maps_that_cannot_be_written_never_cost_a_row(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """run --once with heat maps on and explain.folder taken by a plain file: every file
        still gets its row (heatmap empty) and is moved; each failure is logged."""
        root = tmp_path / "svc"
        root.mkdir()
        shutil.copytree(Path(__file__).parents[1] / "model_store", root / "model_store")  # explainable
        (root / "heatmaps").write_text("not a folder")
        cfg = make_config(explain={"enabled": True})
        files = fixture_images()[::5]
        for p in files:
            shutil.copy(p, cfg.inbox / p.name)
        proc = run_once(cfg, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        rows = read_csv_both(cfg.results)
        assert sorted(p.name for p in files) == sorted(r["file"] for r in rows)
        assert all(
            r["status"] == "ok" and r["heatmap"] == "" and Path(r["destination"]).is_file() for r in rows
        )
        assert len(files) == proc.stdout.count('"heatmap_write_failed"')
        assert "not a folder" == (root / "heatmaps").read_text()
