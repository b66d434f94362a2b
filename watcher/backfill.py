"""``xray-watcher backfill``: score every image of an archive folder into a Parquet dataset.

The daemon's data path, run over a folder that is only read: the candidate rules of
``ingest.scan_inbox`` (default extensions, hidden names skipped, links never followed),
``service.load_item`` (read, sha256, decode, preprocess), ``inference.Predictor`` (one
model version, its threshold and temperature; served as the daemon serves it, by
``inference.serving_predictor``: on a host without GPU, ONNX Runtime from the version's
``model.onnx``, with no TensorFlow in the process) and the columns of ``report.COLUMNS`` (less
``destination`` and ``claim``, plus ``path``, relative to the folder). Values are the
strings results.csv would hold for the same file.

Two engines, the same answers:

* ``local``: decode threads and one in-process Predictor; no Ray needed.
* ``ray``: Ray Data's batch-inference pattern: a dataset of relative paths,
  ``map_batches(decode_batch)`` as CPU tasks, ``map_batches(PredictBatch,
  compute=ActorPoolStrategy(size=N))`` with the model loaded once per actor (one GPU per
  actor where the cluster has GPUs), ``write_parquet``. Ray is imported only here, inside
  the ray engine; the daemon never imports it.

Output and restart: OUT holds ``*.parquet`` parts, each complete. A part is written under
``OUT/.staging/<run>/`` (hidden: Parquet readers skip it), fsynced, then moved into OUT
with ``os.replace``. Each run starts by adopting what a killed run left staged: a part
that reads back whole is moved in, anything else (a part cut off mid-write) is deleted.
Files already scored in OUT, by relative path and sha256, are skipped, so a rerun of a
killed job scores only the rest; a file whose bytes changed gets a new row. A file that
cannot be read or decoded is a ``status=failed`` row with its error, never a crashed job.
For a cluster, DIR, OUT and the model store must be at the same path on every node
(a shared filesystem), and xray-watcher installed on every node.

Usage::

    xray-watcher backfill --data /archive --output /results/archive.parquet [--engine ray]
    python -m watcher.backfill --data /archive --output out/ --store model_store
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from watcher import failpoints, model_store
from watcher.config import DEFAULT_CONFIG, DecodeConfig, IngestConfig, load_config
from watcher.dicom import population_of, population_warning
from watcher.errors import ConfigError, DecodeError, ModelStoreError, WatcherError
from watcher.fsutil import fsync_dir, try_lock
from watcher.imaging import PreprocessSpec
from watcher.ingest import scan_inbox
from watcher.report import COLUMNS, utc_now
from watcher.service import Item, load_item, read_file, second_look_inputs

if TYPE_CHECKING:
    from watcher.inference import Predictor

log = structlog.get_logger()

ENGINES = ("local", "ray")
RAY_EXTRA = "pip install 'xray-watcher[ray]'"
DROPPED = ("destination", "claim")  # daemon-only: no file is moved, nothing is claimed
STAGING = ".staging"
LOCK = ".lock"
DEFAULT_BATCH = 32
DEFAULT_PART_ROWS = 1000

Batch = dict[str, npt.NDArray[Any]]

# the columns this module fills itself; any other column of report.COLUMNS is taken from the
# Item field of the same name (e.g. DICOM identifiers) when there is one, else left empty
_BUILT = frozenset(
    {
        "processed_at", "file", "path", "sha256", "status", "label", "probability", "threshold",
        "model_version", "error", "width", "height", "bytes", "instance", "warning",
    }
)  # fmt: skip


class UsageError(WatcherError):
    """The command line asks for something impossible (exit status 2)."""


class RayNotInstalled(UsageError):
    """``--engine ray`` without the ``ray`` extra."""


# ---------------------------------------------------------------- columns


def output_columns() -> tuple[str, ...]:
    """The dataset's columns: results.csv's, less destination and claim, plus path."""
    cols = [c for c in COLUMNS if c not in DROPPED]
    if "path" not in cols:
        cols.append("path")
    return tuple(cols)


def output_schema() -> pa.Schema:
    """Every column a string, as in results.csv, so every part has the same schema."""
    return pa.schema([(c, pa.string()) for c in output_columns()])


def _item_columns() -> tuple[str, ...]:
    """Output columns carried over from ``Item`` fields of the same name."""
    item_fields = {f.name for f in fields(Item)}
    return tuple(c for c in output_columns() if c not in _BUILT and c in item_fields)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def name_text(name: str) -> str:
    """A file name (or any text) as the dataset stores it: valid UTF-8 that Arrow accepts.

    A name that is not valid UTF-8 reaches Python with its undecodable bytes as lone surrogates
    (``b"bad\\xff.jpeg"`` is ``"bad\\udcff.jpeg"``); those bytes are written backslash-escaped
    (``bad\\xff.jpeg``). Every other name is unchanged. Rows already written are matched
    against the files of a rerun by this same text.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- the two stages


def _current_sha(path: Path, max_bytes: int) -> str:
    """The sha256 ``load_item`` records for this file, without decoding it."""
    try:
        return hashlib.sha256(read_file(path, max_bytes)).hexdigest()
    except DecodeError:
        if path.is_symlink():
            return hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
        return ""


def decode_batch(batch: Batch, *, root: str, spec: dict[str, Any], max_pixels: int, max_bytes: int) -> Batch:
    """Stage 1 (CPU): read, hash, decode and preprocess a batch of relative paths.

    ``batch`` holds ``path`` (relative to ``root``, as :func:`name_text` writes it), ``seen``
    (already in the output), ``expect`` (the sha256s recorded for it, space-separated) and
    optionally ``raw``, the relative path's bytes (``os.fsencode``), which name the file to open
    when ``path`` cannot (a name that is not valid UTF-8). A seen file whose bytes still hash
    to a recorded sha256 comes back with ``skip`` set and is not decoded.
    """
    pspec = PreprocessSpec.from_dict(spec)
    carried = _item_columns()
    blank = np.zeros((pspec.height, pspec.width, 1), dtype=np.float32)
    out: dict[str, list[Any]] = {
        k: []
        for k in (
            "path",
            "sha256",
            "bytes",
            "width",
            "height",
            "error",
            "skip",
            "age_years",
            "age_text",
            "second_look",
            *carried,
        )
    }
    inputs: list[npt.NDArray[np.float32]] = []
    raws = batch["raw"] if "raw" in batch else batch["path"]
    for raw, seen, expect in zip(raws, batch["seen"], batch["expect"], strict=True):
        rel = os.fsdecode(raw)  # bytes from Ray or the local engine; str where a caller gives paths
        path = Path(root, rel)
        recorded = set(str(expect).split(" ")) if seen else set()
        if recorded and _current_sha(path, max_bytes) in recorded:
            item = Item(rel=PurePosixPath(rel), path=path)
            skip = True
        else:
            item = load_item(Item(rel=PurePosixPath(rel), path=path), pspec, max_pixels, max_bytes)
            skip = bool(recorded) and item.sha256 in recorded  # the quick hash disagreed; this one rules
        out["path"].append(name_text(rel))
        out["sha256"].append(item.sha256)
        out["bytes"].append(item.size)
        out["width"].append(item.width)
        out["height"].append(item.height)
        out["error"].append(name_text(item.error))
        out["skip"].append(skip)
        out["age_years"].append(np.nan if item.age_years is None else float(item.age_years))
        out["age_text"].append(item.age_text)
        # the file's path as bytes (Arrow takes any name so): it may need a full decode
        out["second_look"].append(os.fsencode(path) if item.reduced and not skip else b"")
        for col in carried:
            out[col].append(name_text(_text(getattr(item, col))))
        model_input = item.model_input if item.model_input is not None and not skip else blank
        inputs.append(model_input)
    result: Batch = {k: np.asarray(v, dtype=object) for k, v in out.items()}
    for k in ("bytes", "width", "height"):
        result[k] = np.asarray(out[k], dtype=np.int64)
    result["skip"] = np.asarray(out["skip"], dtype=bool)
    result["age_years"] = np.asarray(out["age_years"], dtype=np.float64)
    result["model_input"] = np.stack(inputs) if inputs else np.zeros((0, *blank.shape), np.float32)
    return result


def score_batch(
    predictor: Predictor, batch: Batch, instance: str, limits: DecodeConfig | None = None
) -> pa.Table:
    """Stage 2: predict the decoded rows and build the output rows (skipped rows dropped).

    As in the daemon, a borderline score from a DCT-scaled decode is scored again from a full
    decode (``limits.second_look_margin``).
    """
    limits = limits or DecodeConfig()
    keep = [i for i in range(len(batch["path"])) if not batch["skip"][i]]
    good = [i for i in keep if not batch["error"][i]]
    predictions = predictor.predict([batch["model_input"][i] for i in good])
    by_row = dict(zip(good, predictions, strict=True))
    sources = [os.fsdecode(batch["second_look"][i]) if "second_look" in batch else "" for i in good]
    items = [
        Item(
            rel=PurePosixPath(str(batch["path"][i])),
            path=Path(src),
            sha256=str(batch["sha256"][i]),
            reduced=bool(src),
        )
        for i, src in zip(good, sources, strict=True)
    ]
    full = second_look_inputs(items, [p.probability for p in predictions], predictor.spec, limits)
    again = predictor.predict(list(full.values()))
    by_row.update((good[k], pred) for k, pred in zip(full, again, strict=True))
    columns = output_columns()
    values: dict[str, list[str]] = {c: [] for c in columns}
    threshold = f"{predictor.threshold:.6f}"
    population = population_of(predictor.metadata)
    for i in keep:
        pred = by_row.get(i)
        rel = str(batch["path"][i])
        height = int(batch["height"][i])
        row = {
            "processed_at": utc_now(),
            "file": rel,
            "path": rel,
            "sha256": str(batch["sha256"][i]),
            "status": "ok" if pred else "failed",
            "label": pred.label if pred else "",
            "probability": f"{pred.probability:.6f}" if pred else "",
            "threshold": threshold,
            "model_version": predictor.version,
            "error": str(batch["error"][i]),
            "width": str(int(batch["width"][i])) if height else "",
            "height": str(height) if height else "",
            "bytes": str(int(batch["bytes"][i])),
            "instance": instance,
            "warning": _warning(batch, i, population) if pred else "",
        }
        for col in columns:
            value = row[col] if col in row else _text(batch[col][i]) if col in batch else ""
            values[col].append(name_text(value))
    return pa.table(values, schema=output_schema())


def _warning(batch: Batch, i: int, population: dict[str, Any]) -> str:
    """The daemon's intended-population warning for row ``i`` (DICOM age outside the population)."""
    if "age_years" not in batch:
        return ""
    age = float(batch["age_years"][i])
    return population_warning(None if np.isnan(age) else age, str(batch["age_text"][i]), population)


class PredictBatch:
    """Ray Data callable class: one model version loaded once per actor, then batch after batch."""

    def __init__(
        self, store: str, version: str, limits: dict[str, Any] | None = None, threads: int = 1
    ) -> None:
        from watcher import runtime
        from watcher.inference import serving_predictor

        runtime.quiet_tensorflow(
            "info"
        )  # a Ray worker: TensorFlow's start-up lines (if it loads) kept off stderr
        self.predictor = serving_predictor(Path(store), version, threads=threads)
        self.instance = _instance()
        self.limits = DecodeConfig(**(limits or {}))

    def __call__(self, batch: Batch) -> pa.Table:
        return score_batch(self.predictor, batch, self.instance, self.limits)


def _instance() -> str:
    return f"backfill@{socket.gethostname()}"


# ---------------------------------------------------------------- output folder


class _OutputLock:
    """One backfill at a time per output folder (``flock`` on ``OUT/.lock``)."""

    def __init__(self, output: Path) -> None:
        self.path = output / LOCK
        self._fd: int | None = None

    def __enter__(self) -> _OutputLock:
        try:
            self._fd = try_lock(self.path)
        except OSError as exc:
            raise UsageError(
                f"--output {self.path.parent} cannot be used: cannot create its lock file {self.path.name} "
                f"({exc.strerror or exc})"
            ) from exc
        if self._fd is None:
            raise WatcherError(f"another backfill is writing to {self.path.parent} (lock {self.path})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _publish(staged: Path, output: Path) -> Path:
    """Make a complete staged part durable and move it into ``output`` (atomic rename)."""
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    failpoints.hit("backfill_part_staged")
    target = output / staged.name
    if os.path.lexists(target):  # never replace a published part
        target = output / f"{uuid.uuid4().hex[:8]}-{staged.name}"
    os.replace(staged, target)
    fsync_dir(output)
    return target


def adopt_staged(output: Path) -> list[Path]:
    """Move parts left staged by an earlier (killed) run into ``output``; delete broken ones."""
    staging = output / STAGING
    adopted: list[Path] = []
    if not staging.is_dir():
        return adopted
    for run_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
        for path in sorted(run_dir.rglob("*")):
            if not path.is_file():
                continue
            try:
                if path.suffix != ".parquet":
                    raise ValueError("not a part file")
                pq.read_table(path)  # the whole part, not just its footer
            except (OSError, ValueError, pa.ArrowException) as exc:
                log.warning("backfill_staged_part_dropped", part=str(path), reason=str(exc)[:200])
                path.unlink()
                continue
            adopted.append(_publish(path, output))
        for folder in sorted((p for p in run_dir.rglob("*") if p.is_dir()), reverse=True):
            folder.rmdir()
        run_dir.rmdir()
    _remove_if_empty(staging)
    if adopted:
        log.info("backfill_staged_parts_adopted", n_parts=len(adopted))
    return adopted


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or gone
        folder.rmdir()


def _parts(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("*.parquet") if p.is_file())


def _read_part(part: Path, columns: list[str]) -> pa.Table:
    """``columns`` of a part in OUT, or one clear line for a file that is not a readable part."""
    try:
        return pq.read_table(part, columns=columns)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise WatcherError(f"{part} is not a readable backfill part ({reason}); move it aside") from exc


def scored(output: Path) -> dict[str, set[str]]:
    """Relative path (as :func:`name_text` writes it) -> the sha256s already scored in ``output``."""
    done: dict[str, set[str]] = {}
    for part in _parts(output):
        table = _read_part(part, ["path", "sha256", "model_version"])
        for rel, sha in zip(table["path"].to_pylist(), table["sha256"].to_pylist(), strict=True):
            done.setdefault(rel, set()).add(sha or "")
    return done


def _versions(parts: Sequence[Path]) -> set[str]:
    found: set[str] = set()
    for part in parts:
        found.update(v for v in _read_part(part, ["model_version"])["model_version"].to_pylist())
    return found


def _count(parts: Sequence[Path]) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0}
    for part in parts:
        for status in _read_part(part, ["status"])["status"].to_pylist():
            counts["ok" if status == "ok" else "failed"] += 1
    return counts


class _PartWriter:
    """Buffers scored rows and publishes a part every ``part_rows`` rows (local engine)."""

    def __init__(self, output: Path, run_id: str, part_rows: int) -> None:
        self.output = output
        self.staging = output / STAGING / run_id
        self.run_id = run_id
        self.part_rows = part_rows
        self.parts: list[Path] = []
        self._tables: list[pa.Table] = []
        self._rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._tables.append(table)
            self._rows += table.num_rows
        if self._rows >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = self.staging / f"part-{self.run_id}-{len(self.parts):06d}.parquet"
        pq.write_table(pa.concat_tables(self._tables), staged)
        self.parts.append(_publish(staged, self.output))
        log.info("backfill_part_written", part=self.parts[-1].name, n_rows=self._rows)
        self._tables, self._rows = [], 0

    def close(self) -> None:
        self.flush()
        _remove_if_empty(self.staging)
        _remove_if_empty(self.staging.parent)


# ---------------------------------------------------------------- engines


def _batches(todo: Batch, size: int) -> list[Batch]:
    n = len(todo["path"])
    return [{k: v[i : i + size] for k, v in todo.items()} for i in range(0, n, size)]


def _run_local(
    todo: Batch,
    root: Path,
    output: Path,
    store: Path,
    version: str,
    decode_kwargs: dict[str, Any],
    limits: DecodeConfig,
    batch_size: int,
    part_rows: int,
    workers: int,
    run_id: str,
) -> list[Path]:
    """Decode in ``workers`` threads (a few batches ahead), predict in this thread."""
    from watcher.inference import serving_predictor
    from watcher.runtime import usable_cores

    # the cores the decoding threads leave, as in the daemon (one on 2 cores)
    threads = max(1, usable_cores() - workers)
    predictor = serving_predictor(store, version, threads=threads)
    instance = _instance()
    writer = _PartWriter(output, run_id, part_rows)
    batches = deque(_batches(todo, batch_size))
    with ThreadPoolExecutor(workers, thread_name_prefix="backfill-decode") as pool:
        pending: deque[Future[Batch]] = deque()

        def refill() -> None:
            while batches and len(pending) < workers + 1:
                pending.append(pool.submit(decode_batch, batches.popleft(), root=str(root), **decode_kwargs))

        refill()
        while pending:
            decoded = pending.popleft().result()
            refill()
            writer.add(score_batch(predictor, decoded, instance, limits))
    writer.close()
    return writer.parts


def _run_ray(
    todo: Batch,
    root: Path,
    output: Path,
    store: Path,
    version: str,
    decode_kwargs: dict[str, Any],
    limits: DecodeConfig,
    batch_size: int,
    part_rows: int,
    address: str | None,
    actors: int | None,
    actor_cpus: float | None,
    run_id: str,
) -> tuple[list[Path], dict[str, Any]]:
    """Ray Data: paths -> map_batches(decode) on CPUs -> map_batches(PredictBatch) actors -> Parquet."""
    try:  # typed as Any: Ray's annotations are narrower than its documented API
        ray: Any = importlib.import_module("ray")
        ray_data: Any = importlib.import_module("ray.data")
    except ImportError as exc:
        raise RayNotInstalled(f"--engine ray needs Ray: {RAY_EXTRA} ({exc})") from exc

    info: dict[str, Any] = {}
    started = False
    t0 = time.monotonic()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        started = True
    info["ray_start_s"] = round(time.monotonic() - t0, 2)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        n_actors = actors or (gpus if gpus else max(1, cpus // 8))
        # On CPUs inference is about a sixth of a file's work (decoding is the rest), so by
        # default a CPU actor reserves no core and every core decodes. The differing
        # reservations also keep Ray from fusing the decode tasks into the actors.
        cpus_per_actor = actor_cpus if actor_cpus is not None else (1.0 if gpus else 0.0)
        info.update(cluster_cpus=cpus, cluster_gpus=gpus, actors=n_actors, nodes=len(ray.nodes()))
        log.info("backfill_ray_cluster", **info)
        ray_data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        staging = output / STAGING / run_id
        rows = [
            {"path": str(p), "raw": bytes(r), "seen": bool(s), "expect": str(e)}
            for p, r, s, e in zip(todo["path"], todo["raw"], todo["seen"], todo["expect"], strict=True)
        ]
        ds = ray_data.from_items(rows)
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"root": str(root), **decode_kwargs},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        ds = ds.map_batches(
            PredictBatch,
            fn_constructor_kwargs={
                "store": str(store),
                "version": version,
                "limits": asdict(limits),
                "threads": max(1, int(cpus_per_actor)),  # the model's threads: the cores it reserves
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray_data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus_per_actor,
            num_gpus=1 if gpus else 0,
        )
        try:
            ds.write_parquet(str(staging), min_rows_per_file=part_rows)
        except Exception as exc:  # Ray wraps worker errors in many types
            raise WatcherError(f"the Ray job failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if started:
            ray.shutdown()
    return adopt_staged(output), info


# ---------------------------------------------------------------- entry points


def _make_output(output: Path) -> None:
    """Create the output folder, or a clear :class:`UsageError` saying why it cannot be used."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise UsageError(f"--output {output} cannot be used: it exists and is not a folder") from exc
    except NotADirectoryError as exc:
        raise UsageError(f"--output {output} cannot be used: a folder above it is a file") from exc
    except OSError as exc:
        raise UsageError(f"--output {output} cannot be used: {exc.strerror or exc}") from exc


def backfill(
    data: Path,
    output: Path,
    engine: str = "local",
    address: str | None = None,
    store: Path = Path("model_store"),
    model_version: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    *,
    part_rows: int = DEFAULT_PART_ROWS,
    workers: int | None = None,
    actors: int | None = None,
    actor_cpus: float | None = None,
    limits: DecodeConfig | None = None,
) -> dict[str, Any]:
    """Score every candidate image under ``data`` into the Parquet dataset ``output``.

    Returns a summary: files found, skipped (already in ``output``), scored this run (ok,
    failed), parts written, seconds, files/s, and for Ray its start-up time and cluster.
    """
    t0 = time.monotonic()
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if batch_size < 1 or part_rows < 1 or (workers is not None and workers < 1):
        raise UsageError(f"batch size ({batch_size}), rows per part ({part_rows}) and workers must be >= 1")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise RayNotInstalled(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA}") from exc
    data, output, store = data.resolve(), output.resolve(), store.resolve()
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder")
    if output == data or data in output.parents:
        raise UsageError(
            f"--output {output} is inside --data {data}; the archive is only read, never written"
        )
    if not store.is_dir():
        raise UsageError(f"model store {store} is not a folder (--store, or model_store in the config)")
    if model_version is not None and not (store / model_version).is_dir():
        known = ", ".join(model_store.list_versions(store)) or "none"
        raise UsageError(f"--model-version {model_version}: no such version in {store} (versions: {known})")
    version = model_version or model_store.current_version(store)
    try:
        spec = PreprocessSpec.from_dict(model_store.read_metadata(store, version)["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(f"metadata.json of {version} has no usable preprocessing: {exc}") from exc
    limits = limits or DecodeConfig()
    decode_kwargs = {
        "spec": spec.to_dict(),
        "max_pixels": limits.max_pixels,
        "max_bytes": limits.max_file_mb << 20,
    }
    _make_output(output)
    run_id = uuid.uuid4().hex[:12]
    with _OutputLock(output):
        adopt_staged(output)
        earlier = _versions(_parts(output))
        if earlier - {version}:
            raise UsageError(
                f"{output} holds results of model version(s) {', '.join(sorted(earlier))}, this run uses "
                f"{version}; write to a new --output (one model version per dataset)"
            )
        done = scored(output)
        rels = [p.relative_to(data).as_posix() for p in scan_inbox(data, IngestConfig().extensions)]
        names = [name_text(r) for r in rels]  # as written in the path column, and so matched
        todo: Batch = {
            "path": np.asarray(names, dtype=object),
            "raw": np.asarray([os.fsencode(r) for r in rels], dtype=object),
            "seen": np.asarray([n in done for n in names], dtype=bool),
            "expect": np.asarray([" ".join(sorted(done.get(n, ()))) for n in names], dtype=object),
        }
        n_seen = int(todo["seen"].sum())
        log.info(
            "backfill_started",
            engine=engine,
            data=str(data),
            output=str(output),
            model_version=version,
            n_files=len(rels),
            n_in_output=n_seen,
            run=run_id,
        )
        info: dict[str, Any] = {}
        if not rels:
            parts: list[Path] = []
        elif engine == "local":
            parts = _run_local(
                todo, data, output, store, version, decode_kwargs, limits, batch_size, part_rows,
                workers or os.cpu_count() or 1, run_id,
            )  # fmt: skip
        else:
            parts, info = _run_ray(
                todo, data, output, store, version, decode_kwargs, limits, batch_size, part_rows, address,
                actors, actor_cpus, run_id,
            )  # fmt: skip
    counts = _count(parts)
    seconds = time.monotonic() - t0
    summary: dict[str, Any] = {
        "engine": engine,
        "model_version": version,
        "output": str(output),
        "files": len(rels),
        "skipped": len(rels) - counts["ok"] - counts["failed"],
        "scored": counts["ok"] + counts["failed"],
        "ok": counts["ok"],
        "failed": counts["failed"],
        "parts": len(parts),
        "seconds": round(seconds, 2),
        "files_per_s": round((counts["ok"] + counts["failed"]) / seconds, 1) if seconds > 0 else 0.0,
        **info,
    }
    log.info("backfill_done", **summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``xray-watcher backfill`` (``--config`` included)."""
    parser.add_argument("--data", type=Path, required=True, help="archive folder to score (only read)")
    parser.add_argument(
        "--output", type=Path, required=True, help="Parquet dataset folder (created; resumable)"
    )
    parser.add_argument("--engine", choices=ENGINES, default="local", help="default: %(default)s")
    parser.add_argument(
        "--address", help="Ray cluster to join (ray start --head prints it); default: a local Ray"
    )
    parser.add_argument("--model-version", help="a published version (default: current)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="files per model call")
    parser.add_argument("--store", type=Path, help="model store (default: the config's model_store)")
    parser.add_argument("--rows-per-part", type=int, default=DEFAULT_PART_ROWS, help="rows per Parquet part")
    parser.add_argument("--workers", type=int, help="decode threads, local engine (default: CPU count)")
    parser.add_argument(
        "--actors", type=int, help="inference actors, ray engine (default: one per GPU, else CPUs/8)"
    )
    parser.add_argument(
        "--actor-cpus", type=float, help="CPUs reserved per inference actor (default: 1 with GPUs, else 0)"
    )
    if "--config" not in parser._option_string_actions:
        parser.add_argument(
            "--config", help="config file: model store and decode limits (default: config.yaml)"
        )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``backfill`` from parsed arguments; print the summary as JSON. Exit 0, 1 or 2."""
    try:
        config = getattr(args, "config", None)
        if args.store and config == DEFAULT_CONFIG and not Path(config).exists():
            config = None  # a parser that defaults --config: with --store, no config is needed
        cfg = load_config(Path(config or DEFAULT_CONFIG)) if config or not args.store else None
        summary = backfill(
            args.data,
            args.output,
            engine=args.engine,
            address=args.address,
            store=Path(args.store) if args.store else cfg.model_store if cfg else Path("model_store"),
            model_version=args.model_version,
            batch_size=args.batch_size,
            part_rows=args.rows_per_part,
            workers=args.workers,
            actors=args.actors,
            actor_cpus=args.actor_cpus,
            limits=cfg.decode if cfg else None,
        )
    except (ConfigError, UsageError) as exc:
        print(f"xray-watcher backfill: {exc}", file=sys.stderr)
        return 2
    except WatcherError as exc:
        log.error("fatal_error", error=str(exc), error_type=type(exc).__name__)
        print(f"xray-watcher backfill: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m watcher.backfill``: the same as ``xray-watcher backfill``."""
    from watcher.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="xray-watcher backfill",
        description="Score every image of an archive folder into a Parquet dataset.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("info", "auto", stream=sys.stderr)
    from watcher import runtime

    runtime.quiet_tensorflow("info")  # as the console script does
    return cli_main(args)


if __name__ == "__main__":
    from watcher.backfill import main as _main  # the importable module, so Ray pickles by reference

    raise SystemExit(_main())
