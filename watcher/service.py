"""The daemon: ingest -> claim -> decode -> batch -> infer -> report -> file.

Order of operations for one file (see README "Guarantees"):

1. **claim**: ``os.rename`` from the inbox into ``inbox/.xray-watcher/<instance>/claimed/<id>/<rel>``
   (one claim id per batch). Only one process can win the rename, so two instances never
   take the same file.
2. **read + decode + preprocess** in a worker thread (only claimed files are read).
3. **predict** the batch; **plan** each destination (a free name, never an existing one).
4. **append** the batch's rows to results.csv (one write, fsync).
5. **place** the batch: link every file at its destination (never overwrite), fsync each
   destination folder once, then unlink the claimed names and remove emptied claim folders.

Three threads, each a stage, joined by bounded queues: the *decoder* (claim, read, decode,
steps 1-2, with a pool of decode workers), *inference* (step 3, the model and Grad-CAM) and
the *reporter* (heat-map overlays, steps 4-5, review page, drift), so the model scores the
next batch while the previous one is written. The decoder hands a batch on once its decodes
are submitted to the pool and claims the next, so the pool never idles at a batch boundary;
inference waits for the batch's decodes. Batches keep their order through every stage.

A crash leaves files only in the claim folder; at start-up ``recover`` re-files those whose
row is already in results.csv (same claim id and relative path) and re-processes the
others, so each file gets exactly one row and ends in exactly one place.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import os
import queue
import signal
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import cv2
import numpy as np
import structlog

from watcher import __version__, drift, failpoints, metrics, model_store, runtime, systemd
from watcher.batching import collect_batch
from watcher.config import Config, DecodeConfig, load_config
from watcher.dicom import population_of, population_warning
from watcher.errors import ConfigError, DecodeError, ModelStoreError, ReportError, WatcherError
from watcher.filing import destination_root, link_into, plan_destination
from watcher.fsutil import fsync_dir, try_lock
from watcher.heatmaps import HeatmapWriter
from watcher.imaging import GreyImage, ModelInput, PreprocessSpec, decode, halve, input_floor, preprocess
from watcher.inference import Prediction, Predictor
from watcher.ingest import Ingest
from watcher.logs import capture_library_warnings, configure_logging
from watcher.report import ResultRow, ResultsWriter, find_rows, format_utc, low_disk_warning
from watcher.review import ReviewPage
from watcher.signals import SignalQueue, arm_exit_deadline
from watcher.status import DiskUsage, StatusWriter, clear_pending, make_state, summary_line, write_pending

log = structlog.get_logger()

T = TypeVar("T")
CLAIMED = "claimed"
_MAX_BACKOFF_S = 60.0
TICK_S = 5.0  # state file, STATUS= and queue-depth gauge
DISK_CHECK_S = 300.0
# what SIGHUP may change in a running daemon (the rest is logged as needing a restart)
LOCK_RETRIES, LOCK_RETRY_S = 10, 0.1  # a held instance lock is asked again for 1 s
_LIVE_SECTIONS = {"batch", "log", "metrics", "review"}
_LIVE_KEYS = {"ingest.rescan_interval_s", "ingest.settle_ms", "model_poll_s", "report.min_free_mb"}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{"batch.max_size": 32, ...}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _diff(old: Config, new: Config) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [k for k in a if a[k] != b.get(k)]


def _with(cfg: Any, key: str, value: Any) -> Any:
    """A copy of a (nested, frozen) config with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _with(getattr(cfg, head), rest, value)})


@dataclass
class Item:
    """One file on its way through the pipeline."""

    rel: PurePosixPath  # path relative to the inbox, as reported
    path: Path  # where the file is now (its claim, or the user's path for ``predict``)
    sha256: str = ""
    size: int = 0
    width: int = 0  # of the decoded image (the image itself is not kept: only the model input)
    height: int = 0
    model_input: ModelInput | None = None
    spec: PreprocessSpec | None = None
    error: str = ""
    known_destination: str = ""  # recovery: the row exists already, only the move is owed
    claim_dir: Path | None = None
    study_instance_uid: str = ""  # DICOM only; nothing else of the patient is kept
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    age_years: float | None = None
    age_text: str = ""
    thumb: GreyImage | None = None  # a small copy of the radiograph, for the heat map overlay
    reduced: bool = False  # decoded DCT-scaled (a large JPEG), not in full
    decode_s: float = 0.0  # read, hash, decode and preprocess


def read_file(path: Path, max_bytes: int) -> bytes:
    """Read a file without following a symbolic link; errors in plain words."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if path.is_symlink():
            raise DecodeError("the file is a symbolic link; links are not followed") from exc
        if isinstance(exc, PermissionError):
            raise DecodeError("permission denied: the service may not read this file") from exc
        raise DecodeError(f"cannot open the file: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not a regular file (device, socket or pipe)")
        if st.st_size > max_bytes:
            raise DecodeError(f"the file is {st.st_size:,} bytes, more than the limit of {max_bytes:,}")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


@dataclass
class Scored:
    """A batch after inference, on its way to the reporter (stage 3)."""

    items: list[Item]
    predictor: Predictor  # the version that scored it, even if another is served meanwhile
    predictions: dict[int, Prediction]  # by id(item), for the items that decoded
    cams: dict[int, Any]  # Grad-CAM maps by id(item), when heat maps are on
    population: dict[str, Any]  # the scoring version's intended population
    drift: drift.DriftMonitor | None  # and its drift monitor
    started: float  # time.monotonic() when inference began
    infer_s: float
    second_look: list[Item] = dataclasses.field(default_factory=list)  # owed a pass from a full decode
    n_second_look: int = 0  # files whose answer came from that pass


DECODE_SLOW_S = 60.0  # a batch whose decodes have not all returned by then is logged, and again each period


@dataclass
class Decoding:
    """A claimed batch whose files the decode pool is working on, on its way to inference.

    The decoder thread hands it over as soon as the decodes are submitted and goes on to claim
    the next batch, so the pool always has work queued: no core waits at a batch boundary for
    the batch's slowest decode, or for the next batch's claims.
    """

    items: list[Item]
    decodes: dict[Future[Item], Item]  # the items being decoded (not those only owed a move)
    submitted: float  # time.monotonic()

    def result(self, keep_alive: Callable[[], None], slow_after: float = DECODE_SLOW_S) -> list[Item]:
        """The items once every decode has finished, calling ``keep_alive`` every 0.2 s meanwhile.

        A read or decode that has not returned after ``slow_after`` seconds (a hung network
        mount, a wedged decoder) is logged as ``decode_slow`` with its files, and again every
        ``slow_after`` seconds while it lasts: the files stay claimed, and nothing behind them moves.
        """
        pending: set[Future[Item]] = set(self.decodes)
        warn_at = self.submitted + slow_after
        while pending:
            _, pending = wait(pending, timeout=0.2)
            if pending:
                keep_alive()
                now = time.monotonic()
                if now >= warn_at:
                    warn_at = now + slow_after
                    log.warning(
                        "decode_slow",
                        waited_s=round(now - self.submitted, 1),
                        files=sorted(str(self.decodes[f].rel) for f in pending),
                        hint="a read or decode has not returned: check the filesystem these files are on",
                    )
        for future in self.decodes:
            future.result()  # load_item keeps a file's errors in its item: this raises only on a bug
        log.debug(
            "batch_decoded",
            n_files=len(self.decodes),
            decode_ms=round((time.monotonic() - self.submitted) * 1000, 1),
        )
        return self.items


THUMB_SIDE = 256  # longest side of the radiograph kept for a heat map overlay (PNG cost ~ pixels)


def thumbnail(image: GreyImage, side: int = THUMB_SIDE) -> GreyImage:
    """A copy of ``image`` whose longest side is at most ``side``, for display only.

    Exact halvings by 2x2 averaging while the image is more than twice too large (OpenCV's
    integer-factor area path; an odd last row or column is dropped), then bilinear: alike to
    the eye to one area resize, and 10x cheaper when a decode comes out 3-4x the thumbnail
    (0.15 instead of 2.0 ms from 1000x750 on this project's machine).
    """
    out = image
    while max(out.shape) >= 2 * side and min(out.shape) >= 2:
        out = halve(out)
    h, w = out.shape
    scale = min(1.0, side / max(h, w))
    if scale >= 1.0:
        return out.copy() if out is image else out
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(out, size, interpolation=cv2.INTER_LINEAR), dtype=np.uint8)


def load_item(
    item: Item,
    spec: PreprocessSpec,
    max_pixels: int,
    max_bytes: int,
    accept_any_body_part: bool = False,
    keep_thumbnail: bool = False,
) -> Item:
    """Hash, decode and preprocess one item in place; failures go to ``item.error``."""
    t0 = time.perf_counter()
    try:
        data = read_file(item.path, max_bytes)
        item.size = len(data)
        item.sha256 = hashlib.sha256(data).hexdigest()
        decoded = decode(data, max_pixels, accept_any_body_part, min_size=input_floor(spec))
        image = decoded.image
        if decoded.dicom is not None:
            info = decoded.dicom
            item.study_instance_uid = info.study_instance_uid
            item.series_instance_uid = info.series_instance_uid
            item.sop_instance_uid = info.sop_instance_uid
            item.age_years, item.age_text = info.age_years, info.age_text
        item.height, item.width = decoded.height, decoded.width  # the file's size, not the decode's
        item.reduced = decoded.reduced
        item.model_input = preprocess(image, spec)  # a full-size image is not held past here
        item.spec = spec
        if keep_thumbnail:
            item.thumb = thumbnail(image)
        failpoints.hit("decoded")
    except DecodeError as exc:
        item.error = str(exc)
        if not item.sha256 and item.path.is_symlink():
            item.sha256 = hashlib.sha256(os.fsencode(os.readlink(item.path))).hexdigest()
    except Exception as exc:  # isolation: one odd file must never stop the service
        log.exception("decode_unexpected_error", file=str(item.rel))
        item.error = f"unexpected error while decoding: {type(exc).__name__}: {exc}"
    item.decode_s = time.perf_counter() - t0
    return item


def needs_second_look(item: Item, probability: float, margin: float) -> bool:
    """Whether a DCT-scaled decode scored ``probability`` close enough to 0.5 to decode it in full.

    The fast decode moves the network's logit a little (0.08 at the median, 0.57 at most on the
    80 full-resolution originals, v0004); the probability then moves by about that times p(1 - p),
    which is largest near 0.5. Outside [0.05, 0.95] it stayed within 0.01 on those files.
    """
    return item.reduced and 0.0 < margin <= probability <= 1.0 - margin


def full_decode_input(
    item: Item, spec: PreprocessSpec, max_pixels: int, max_bytes: int, accept_any_body_part: bool = False
) -> ModelInput | None:
    """The model input from a full (not DCT-scaled) decode of the item's file, for a second look.

    None, and the fast decode's answer stands, when the file cannot be read again or no longer
    hashes to ``item.sha256``; ``item`` itself is left alone.
    """
    try:
        data = read_file(item.path, max_bytes)
        if hashlib.sha256(data).hexdigest() != item.sha256:
            log.warning(
                "second_look_skipped", file=str(item.rel), reason="the file changed since it was hashed"
            )
            return None
        return preprocess(decode(data, max_pixels, accept_any_body_part).image, spec)
    except DecodeError as exc:
        log.warning("second_look_skipped", file=str(item.rel), reason=str(exc))
        return None
    except Exception as exc:  # the fast decode's answer stands; never fail a row here
        log.exception("second_look_failed", file=str(item.rel), error=f"{type(exc).__name__}: {exc}")
        return None


def second_look_inputs(
    items: Sequence[Item],
    probabilities: Sequence[float],
    spec: PreprocessSpec,
    limits: DecodeConfig,
    accept_any_body_part: bool = False,
) -> dict[int, ModelInput]:
    """Full-decode model inputs, by index, for the items that need a second look.

    The one place the daemon, ``predict`` and ``backfill`` decide it: an item whose fast
    decode scored within ``limits.second_look_margin`` and that can still be read (else its
    fast answer stands and it is left out).
    """
    out: dict[int, ModelInput] = {}
    for k, (item, p) in enumerate(zip(items, probabilities, strict=True)):
        if needs_second_look(item, p, limits.second_look_margin):
            x = full_decode_input(
                item, spec, limits.max_pixels, limits.max_file_mb << 20, accept_any_body_part
            )
            if x is not None:
                out[k] = x
    return out


class InstanceLock:
    """An exclusive lock on this instance's work folder: one daemon per instance id."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.path)
        for _ in range(LOCK_RETRIES):  # `status` probes it with a shared lock for an instant
            if fd is not None:
                break
            time.sleep(LOCK_RETRY_S)
            fd = try_lock(self.path)
        if fd is None:
            raise WatcherError(
                f"another xray-watcher with the same instance_id already works on this inbox "
                f"(lock {self.path} is held); give each instance its own instance_id"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Service:
    """Wires ingest, decoding, inference, report and filing together."""

    def __init__(self, cfg: Config, predictor: Predictor | None = None) -> None:
        self.cfg = cfg
        self.claim_root = cfg.work_dir / CLAIMED
        self.ingest = Ingest(cfg)
        self.results = ResultsWriter(cfg.results, cfg.report)
        self.predictor = predictor
        self._explainer: Any = None  # GradCam or OnnxModel of the serving model when explain.enabled
        self._device: dict[str, Any] = {}  # runtime.configure_tensorflow()'s answer
        self._drift: drift.DriftMonitor | None = None
        self._heatmaps = HeatmapWriter(
            cfg.explain.folder,
            cfg.filing.layout,
            cfg.source.parent if cfg.source is not None else Path.cwd(),  # rows name them from here
            cfg.decode.workers,
        )
        self._drift_message = ""
        self._population: dict[str, Any] = {}
        page = cfg.review_page
        self.review = ReviewPage(page, cfg, max_rows=cfg.review.max_rows) if page is not None else None
        self._lock = InstanceLock(cfg.work_dir)
        self._stop_taking = threading.Event()  # SIGTERM: take no new files
        self._input_done = threading.Event()  # --once: nothing more will arrive
        self._no_more_input = threading.Event()  # either of the two: stop waiting for files
        self._reload_now = threading.Event()  # SIGHUP
        self._signals = SignalQueue()  # filled by the signal handler, emptied by the main thread
        self._stop_deadline = False  # install_signal_handlers(stop_deadline=True): bounded stop
        self._decoded: queue.Queue[Decoding | None] = queue.Queue(maxsize=2)
        self._scored: queue.Queue[Scored | None] = queue.Queue(maxsize=1)
        self._reporter_error: BaseException | None = None
        self._reporter_beat = time.monotonic()
        self._ping_every = systemd.watchdog_interval_s()  # None when systemd asked for no watchdog
        self._last_ping = 0.0
        self._recovered: list[Item] = []
        # destinations that rows already name and whose files are still to be moved there
        # (recovery): no fresh file may plan one, whichever batch each lands in (reporter only)
        self._owed: set[Path] = set()
        # versions CURRENT named that did not load, with their files' fingerprint: retried when
        # the files change (a fixed mode, a version of that name published again) or on SIGHUP
        self._bad_versions: dict[str, tuple[tuple[Any, ...], str]] = {}  # fingerprint, error
        self._model_problem = ""  # CURRENT's version does not serve: why, for status and STATUS=
        self._pointer_error = ""  # the last model_pointer_unreadable logged (once per distinct error)
        self._last_model_check = time.monotonic()
        self.counts = {"ok": 0, "failed": 0, "batches": 0, "recovered": 0, "warnings": 0}
        self.metrics: metrics.Metrics | metrics.NoMetrics = metrics.NoMetrics()
        self._kept_metrics: metrics.Metrics | None = None  # every Metrics made: its counts carry on
        self._status = StatusWriter(cfg.status_file)
        self._disk = DiskUsage.for_config(cfg)
        self._started_at = time.time()
        self._last_batch_at: float | None = None
        self._last_tick = 0.0
        self._last_disk_check = 0.0

    # ------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop taking files; finish what is claimed; then ``run`` returns."""
        self._stop_taking.set()
        self._no_more_input.set()

    def request_reload(self) -> None:
        """Check the model store for a new current version now."""
        self._reload_now.set()

    def install_signal_handlers(self, stop_deadline: bool = False) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads the model (main thread only).

        The handler only queues the signal (``watcher.signals``); the main thread acts on it
        within about 0.2 s (``_take_signals``). With ``stop_deadline`` (the ``run`` command's
        process, not a test's), a process still alive ``stop_timeout_s`` after the first
        SIGTERM/SIGINT dumps its threads' stacks to stderr and exits with status 1; claimed
        files are recovered at the next start, as after a crash.
        """
        self._stop_deadline = stop_deadline
        self._signals.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    def _take_signals(self) -> None:
        """Act on the signals queued since the last call (main thread)."""
        for sig in self._signals.take():
            if sig == signal.SIGHUP:
                self.request_reload()
                continue
            if self._stop_deadline and not self._stop_taking.is_set():
                arm_exit_deadline(self.cfg.stop_timeout_s)
                log.info("stop_deadline_armed", stop_timeout_s=self.cfg.stop_timeout_s)
            self.request_stop()

    def run(self, once: bool = False, on_ready: Callable[[], None] | None = None) -> int:
        """Process the inbox; with ``once`` return when it is empty, else run until stopped."""
        capture_library_warnings()
        log.info("starting", version=__version__, config=str(self.cfg.source), instance=self.cfg.instance_id)
        self._lock.acquire()
        try:
            clear_pending(self.cfg.work_dir)  # word an earlier daemon left for `status` here
            self.results.open()
            self._start_metrics()
            self._device = runtime.detect_device()
            if not self._wants_onnx():  # TensorFlow serves: its pools set before it loads a model
                self._device = runtime.configure_tensorflow()
            log.info("device", **self._device)
            if self.predictor is None:
                self.predictor = self._first_model()
            else:
                self._prepare(self.predictor)
            self._serving(self.predictor)
            warm_s = self.predictor.warm_up(self.cfg.batch.max_size)
            self._check_disk()
            log.info(
                "model_loaded",
                model_version=self.predictor.version,
                threshold=self.predictor.threshold,
                architecture=self.predictor.metadata.get("architecture"),
                runtime=self.predictor.runtime,
                onnx_graph=self.predictor.onnx_graph or None,
                tensorflow_loaded="tensorflow" in sys.modules,
                warm_up_ms=round(warm_s * 1000, 1),
            )
            self._recover()
            decoder = threading.Thread(target=self._decode_loop, name="decoder", daemon=True)
            decoder.start()
            if once:
                self._feed_once()
            else:
                self.ingest.start()
                log.info(
                    "watching",
                    inbox=str(self.cfg.inbox),
                    observer=self.cfg.ingest.observer,
                    instance=self.cfg.instance_id,
                )
            systemd.notify(f"READY=1\nSTATUS=serving model {self.predictor.version}")
            self._tick(force=True)
            if on_ready is not None:
                on_ready()
            self._infer_loop()
            systemd.notify("STOPPING=1")
            decoder.join()
            if self.review is not None:
                self.review.write(self.predictor)
        finally:
            self.ingest.stop()
            self.results.close()
            self.metrics.stop()
            self._status.remove()
            self._heatmaps.close()
            self._lock.release()
        log.info(
            "stopped",
            files_ok=self.counts["ok"],
            files_failed=self.counts["failed"],
            batches=self.counts["batches"],
            recovered=self.counts["recovered"],
            population_warnings=self.counts["warnings"],
            rows_written=self.results.rows_written,
        )
        failpoints.hang("stopped")  # tests: a teardown that never ends
        return 0

    def _feed_once(self) -> None:
        """--once: everything in the inbox now, each file once it has settled."""
        self.ingest.rescan()
        while True:
            self._take_signals()
            if self._stop_taking.is_set():
                break
            self.ingest.settle()
            if self.ingest.pending_count() == 0:
                break
            time.sleep(0.05)
        self._input_done.set()
        self._no_more_input.set()

    # ------------------------------------------------------------ recovery

    def _claim_dirs(self) -> list[Path]:
        if not self.claim_root.is_dir():
            return []
        return sorted(p for p in self.claim_root.iterdir() if p.is_dir())

    def _recover(self) -> None:
        """Re-queue files left claimed by a previous run of this instance."""
        claim_dirs = self._claim_dirs()
        if not claim_dirs:
            return
        claimed = {d.name for d in claim_dirs}
        # a claim's rows are written after its folder was made: only the tail is read
        oldest = min(d.stat().st_mtime for d in claim_dirs)
        not_before = format_utc(datetime.fromtimestamp(oldest, timezone.utc) - timedelta(hours=1))
        done = find_rows(self.cfg.results, claimed, self.cfg.instance_id, not_before)
        for claim_dir in claim_dirs:
            files: list[Path] = []
            for root, dirs, names in os.walk(claim_dir, topdown=False):
                # os.walk lists a link to a folder among the folders; it is a claimed file too
                files += [Path(root) / n for n in names]
                files += [Path(root) / d for d in dirs if os.path.islink(os.path.join(root, d))]
                if not names and not os.listdir(root):
                    os.rmdir(root)  # a folder left empty by a crash
            for path in sorted(files):
                rel = PurePosixPath(path.relative_to(claim_dir).as_posix())
                item = Item(rel=rel, path=path, claim_dir=claim_dir)
                item.known_destination = done.get((claim_dir.name, str(rel)), "")
                self._recovered.append(item)
        if not self._recovered:
            return
        self._owed = {Path(i.known_destination) for i in self._recovered if i.known_destination}
        self.counts["recovered"] = len(self._recovered)
        log.warning(
            "recovering_claimed_files",
            n_files=len(self._recovered),
            already_reported=sum(1 for i in self._recovered if i.known_destination),
        )

    # ------------------------------------------------------------ stage 1: claim + decode

    def _claim(self, path: Path, claim_dir: Path) -> Item | None:
        try:
            rel = PurePosixPath(path.relative_to(self.cfg.inbox).as_posix())
        except ValueError:
            return None
        if _through_link(self.cfg.inbox, path):
            log.warning("claim_refused_link_folder", file=str(rel), reason="a folder on its path is a link")
            return None
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):  # a folder that took a file's name since it was seen
                return None  # (its files are files of their own, found by the scan)
        except FileNotFoundError:
            return None
        target = claim_dir.joinpath(*rel.parts)
        if os.path.lexists(target):  # the same name twice in one batch: a claim of its own
            claim_dir = self.claim_root / uuid.uuid4().hex
            target = claim_dir.joinpath(*rel.parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)  # our own claim folder: nothing there to replace
            failpoints.hit("claimed")
        except FileNotFoundError:
            _prune_empty(target.parent, self.claim_root)  # taken by another instance, or gone
            return None
        except OSError as exc:
            _prune_empty(target.parent, self.claim_root)
            log.error("claim_failed", file=str(rel), error=exc.strerror or str(exc))
            return None
        return Item(rel=rel, path=target, claim_dir=claim_dir)

    def _decode_loop(self) -> None:
        cfg = self.cfg
        max_bytes = cfg.decode.max_file_mb << 20
        try:
            with ThreadPoolExecutor(cfg.decode.workers, thread_name_prefix="decode") as pool:
                while self._recovered:
                    batch, self._recovered = (
                        self._recovered[: cfg.batch.max_size],
                        self._recovered[cfg.batch.max_size :],
                    )
                    self._decode_batch(pool, batch, max_bytes)
                while not self._stop_taking.is_set():
                    paths = collect_batch(
                        self.ingest.ready,
                        cfg.batch.max_size,
                        cfg.batch.max_wait_ms / 1000.0,
                        stop=self._no_more_input,
                        send_now=self._decoded.empty,  # the model has nothing queued: go now
                    )
                    if not paths:
                        break  # empty only once no more input will come
                    items = []
                    claim_dir = self.claim_root / uuid.uuid4().hex
                    for path in paths:
                        item = self._claim(path, claim_dir)
                        self.ingest.done(path)
                        if item is not None:
                            items.append(item)
                    if items:
                        self._sync_claims(items)
                        self._decode_batch(pool, items, max_bytes)
        except Exception:
            log.exception("decoder_crashed")
            self.request_stop()
        finally:
            self._decoded.put(None)

    def _sync_claims(self, items: list[Item]) -> None:
        """Make the batch's claim renames durable before any of its rows can be.

        Otherwise a power cut could bring a file back into the inbox after its row was
        written, and it would be processed twice. One fsync per folder touched, per batch.
        """
        folders: set[Path] = set()
        for item in items:
            folder = item.path.parent
            while folder != self.claim_root.parent and self.claim_root.parent in folder.parents:
                folders.add(folder)  # the file's claim folders, up to the claim root
                folder = folder.parent
            folders.add(self.cfg.inbox.joinpath(*item.rel.parts).parent)  # where it was taken from
        for folder in sorted(folders):
            try:
                fsync_dir(folder)
            except OSError as exc:  # the rows and moves are fsynced too; log, never stop here
                log.warning("claim_fsync_failed", folder=str(folder), error=exc.strerror or str(exc))

    def _decode_batch(self, pool: ThreadPoolExecutor, items: list[Item], max_bytes: int) -> None:
        assert self.predictor is not None
        spec = self.predictor.spec
        todo = [i for i in items if not i.known_destination]
        decodes = {pool.submit(self._load, i, spec, max_bytes): i for i in todo}
        self._decoded.put(Decoding(items, decodes, time.monotonic()))

    def _load(self, item: Item, spec: PreprocessSpec, max_bytes: int) -> Item:
        return load_item(
            item,
            spec,
            self.cfg.decode.max_pixels,
            max_bytes,
            accept_any_body_part=self.cfg.dicom.accept_any_body_part,
            keep_thumbnail=self.cfg.explain.enabled,
        )

    # ------------------------------------------------------------ stage 2: infer + report + file

    def _start_metrics(self) -> None:
        try:  # the counts of this process carry over a reload that moves or re-enables the endpoint
            self.metrics = metrics.create(self.cfg.metrics, keep=self._kept_metrics)
        except OSError as exc:
            raise WatcherError(
                f"cannot serve metrics on {self.cfg.metrics.host}:{self.cfg.metrics.port}: "
                f"{exc.strerror or exc} (metrics.port in {self.cfg.source})"
            ) from exc
        if isinstance(self.metrics, metrics.Metrics):
            self._kept_metrics = self.metrics
        if self.cfg.metrics.port:
            log.info("metrics_serving", host=self.cfg.metrics.host, port=self.cfg.metrics.port)

    def queue_depth(self) -> int:
        """Files noticed but not yet scored: settling, ready, and claimed batches waiting for
        inference (decoding or decoded)."""
        waiting = sum(len(b.items) for b in list(self._decoded.queue) if b)
        waiting += sum(len(b.items) for b in list(self._scored.queue) if b)
        return self.ingest.pending_count() + self.ingest.ready.qsize() + waiting

    def _tick(self, force: bool = False) -> None:
        """Queued signals; and every few seconds the state file for ``status``, systemd's STATUS=, metrics."""
        self._take_signals()
        now = time.monotonic()
        if not force and now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        assert self.predictor is not None
        depth = self.queue_depth()
        self.metrics.set_queue_depth(depth)
        state = make_state(
            self.cfg,
            started_at=self._started_at,
            model_version=self.predictor.version,
            files_ok=self.counts["ok"],
            files_failed=self.counts["failed"],
            queue_depth=depth,
            last_batch_at=self._last_batch_at,
            disk=self._disk.current(),
            tick_s=TICK_S,
        )
        state["drift"] = self._drift_message
        state["model_problem"] = self._model_problem
        try:
            self._status.write(state)
        except OSError as exc:
            log.warning("status_write_failed", path=str(self.cfg.status_file), error=exc.strerror or str(exc))
        systemd.notify("STATUS=" + summary_line(state))
        if now - self._last_disk_check >= DISK_CHECK_S:
            self._check_disk()

    def _check_disk(self) -> None:
        self._last_disk_check = time.monotonic()
        cfg = self.cfg
        try:
            warning = low_disk_warning(cfg.results, cfg.processed, cfg.failed, cfg.report.min_free_mb)
        except OSError as exc:
            warning = f"cannot measure free space: {exc.strerror or exc}"
        if warning:
            log.warning("disk_space_low", message=warning, min_free_mb=cfg.report.min_free_mb)

    def _infer_loop(self) -> None:
        """Stage 2: score each decoded batch and hand it to the reporter (stage 3).

        The reporter draws heat maps, appends rows and moves files while this loop already
        scores the next batch, so the model never waits for PNG encoding or fsyncs. A batch
        with borderline files (the second look) is held until their full decodes are scored,
        in the next batch's pass if that batch is already claimed (its decodes under way or
        done), else alone at once.
        """
        reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)
        reporter.start()
        held: Scored | None = None  # its second look rides along with the next batch's pass
        try:
            while True:
                self._keep_alive()
                try:  # with a batch held, only take one already claimed: never wait for files
                    decoding = self._decoded.get(block=held is None, timeout=0.2)
                except queue.Empty:
                    if held is not None:
                        held = self._hand_over_after(held, self._infer([], held))
                    else:
                        self._maybe_reload()
                    continue
                if decoding is None:
                    if held is not None:
                        self._hand_over_after(held, self._infer([], held))
                    break
                items = decoding.result(keep_alive=self._keep_alive)
                if held is not None and self._reload_due():  # complete it under the model that held it
                    held = self._hand_over_after(held, self._infer([], held))
                if held is None:
                    self._maybe_reload()
                held = self._hand_over_after(held, self._infer(items, held))
        finally:
            self._hand_over(None)
            while reporter.is_alive():  # signals are taken here too: a SIGTERM during a fault
                reporter.join(timeout=0.2)  # the reporter retries (a stuck move) still stops it
                self._keep_alive()
        if self._reporter_error is not None:
            raise self._reporter_error

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1 while both stages make progress: a wedged stage stops the pings.

        The reporter counts as alive while it waits for work or retries with backoff (it
        beats on each try); one write stuck longer than the watchdog period stops the pings.
        """
        if self._ping_every is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._ping_every and now - self._reporter_beat < 2 * self._ping_every:
            systemd.notify("WATCHDOG=1")
            self._last_ping = now

    def _keep_alive(self) -> None:
        """What the inference loop does while it waits: the watchdog, signals, the status file."""
        self._ping_watchdog()
        self._tick()

    def _hand_over_after(self, held: Scored | None, scored: Scored) -> Scored | None:
        """Hand over ``held`` (now complete), then ``scored`` unless its second look is still
        owed; returns the batch to hold, if any."""
        if held is not None:
            self._hand_over(held)
        if scored.second_look:
            return scored
        if scored.items:  # not the empty pass that only completed ``held``
            self._hand_over(scored)
        return None

    def _hand_over(self, scored: Scored | None) -> None:
        """Queue a scored batch for the reporter, feeding the watchdog while the queue is full."""
        while True:
            if self._reporter_error is not None and scored is not None:
                raise self._reporter_error
            try:
                self._scored.put(scored, timeout=0.2)
                return
            except queue.Full:
                if self._reporter_error is not None:
                    return  # the reporter is gone: nothing will take it
                self._keep_alive()

    def _report_loop(self) -> None:
        """Stage 3, in order: heat maps, rows, moves, review page, drift, per batch."""
        try:
            while True:
                self._reporter_beat = time.monotonic()
                try:  # beats well inside the watchdog's window (2 ping periods), however short
                    scored = self._scored.get(timeout=min(0.5, self._ping_every or 0.5))
                except queue.Empty:
                    continue
                if scored is None:
                    return
                self._report(scored)
        except BaseException as exc:  # surfaces in the inference loop, which stops the daemon
            log.exception("reporter_crashed")
            self._reporter_error = exc
            self.request_stop()

    def _reload_due(self) -> bool:
        """A SIGHUP is pending or the model store is due a look (``model_poll_s``)."""
        return self._reload_now.is_set() or time.monotonic() - self._last_model_check >= self.cfg.model_poll_s

    def _load_version(self, version: str) -> Predictor:
        """``version`` made ready to serve (``_prepare``); any failure is a ``ModelStoreError``."""
        try:
            predictor = Predictor(self.cfg.model_store, version, load_model=False)
            self._prepare(predictor)
        except ModelStoreError:
            raise
        except Exception as exc:  # a damaged version must never take the daemon down
            raise ModelStoreError(f"cannot load {version}: {type(exc).__name__}: {exc}") from exc
        return predictor

    def _first_model(self) -> Predictor:
        """The version CURRENT names, ready to serve. Where it cannot load (or CURRENT cannot be
        read, or names a version that is gone), the version it replaced, the one ``models
        rollback`` would go back to, where that one loads (``model_fallback``, and ``status``
        says the daemon is degraded): a restart after a bad promotion or a damaged version keeps
        scoring files, with no version older than that. Raises the first ``ModelStoreError``
        when neither loads."""
        store = self.cfg.model_store
        try:
            wanted: str | None = model_store.current_version(store)
        except ModelStoreError as exc:
            wanted, first = None, exc
            self._pointer_error = str(exc)  # logged here, not again at the first poll
            log.error("model_pointer_unreadable", error=str(exc), serving=None)
        if wanted is not None:
            fingerprint = _fingerprint(store / wanted)  # before the load: a fix meanwhile is seen
            try:
                return self._load_version(wanted)
            except ModelStoreError as exc:
                first = exc
            self._bad_versions[wanted] = (fingerprint, str(first))
            log.error("model_load_failed", version=wanted, error=str(first), serving=None)
        named = wanted or model_store.pointer(store)
        try:
            stack = model_store.promotion_stack(store)
        except (WatcherError, OSError):
            stack = []
        before = stack[-2:-1] if stack and stack[-1] == named else stack[-1:]
        for version in (v for v in before if v != named):
            try:
                predictor = self._load_version(version)
            except ModelStoreError as exc:
                log.error("model_load_failed", version=version, error=str(exc), serving=None)
                break
            self._model_problem = _not_served(wanted, first, version)
            log.error(
                "model_fallback",
                current=named,
                serving=version,
                error=str(first),
                remedy="fix CURRENT's version or roll back (xray-watcher models rollback); "
                "the daemon swaps as soon as CURRENT's version loads",
            )
            return predictor
        raise first

    def _maybe_reload(self) -> None:
        """A due look at the model store (and config on SIGHUP); ``status`` sees a change of the
        model's health at once, not at the next tick."""
        if not self._reload_due():
            return
        problem = self._model_problem
        self._reload_model()
        if self._model_problem != problem:
            self._tick(force=True)

    def _reload_model(self) -> None:
        forced = self._reload_now.is_set()
        self._reload_now.clear()
        self._last_model_check = time.monotonic()
        if forced:
            self._reload_config()
        assert self.predictor is not None
        serving = self.predictor.version
        try:
            wanted = model_store.current_version(self.cfg.model_store)
        except (ModelStoreError, OSError) as exc:
            if str(exc) != self._pointer_error:  # once per distinct error, not at every poll
                log.error("model_pointer_unreadable", error=str(exc), serving=serving)
            self._pointer_error = str(exc)
            self._model_problem = f"{exc}; serving {serving}"
            return
        if self._pointer_error:
            log.info("model_pointer_readable", current=wanted, serving=serving)
            self._pointer_error = ""
        if wanted == serving:
            self._model_problem = ""
            return
        fingerprint = _fingerprint(self.cfg.model_store / wanted)
        known = self._bad_versions.get(wanted)
        if not forced and known is not None and known[0] == fingerprint:
            # CURRENT back on a version that failed, its files unchanged: still degraded
            self._model_problem = _not_served(wanted, known[1], serving)
            return
        try:
            new = self._load_version(wanted)
        except ModelStoreError as exc:
            self._bad_versions[wanted] = (fingerprint, str(exc))
            self._model_problem = _not_served(wanted, exc, serving)
            log.error(
                "model_load_failed",
                version=wanted,
                error=str(exc),
                serving=serving,
                retry="when the version's files change, or on SIGHUP",
            )
            return
        self._bad_versions.pop(wanted, None)
        self.predictor = new
        self._serving(new)
        self._model_problem = ""
        log.info(
            "model_swapped",
            previous=serving,
            model_version=new.version,
            threshold=new.threshold,
            runtime=new.runtime,
        )

    def _reload_config(self) -> None:
        """SIGHUP: re-read config.yaml; apply what can change live, name what needs a restart."""
        if self.cfg.source is None:
            return
        try:
            new = load_config(self.cfg.source)
        except Exception as exc:  # ConfigError, or anything a file can hold: never fatal here
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("config_reload_failed", error=error, kept="the running configuration")
            return
        old = self.cfg
        changed = set(_diff(old, new))
        # listener.* belongs to `xray-watcher listen`: restarting this daemon changes nothing there
        listener = sorted(k for k in changed if k.startswith("listener."))
        live = {k for k in changed if k.split(".")[0] in _LIVE_SECTIONS or k in _LIVE_KEYS}
        restart = sorted(changed - live - set(listener))
        merged, running = new, _flat(old)
        for key in restart:  # keep the running value of what cannot change live
            merged = _with(merged, key, running[key])
        self.cfg = merged
        self.ingest.cfg = merged
        if new.work_dir != old.work_dir:  # `status` with the edited file looks there: leave word
            try:
                write_pending(new.work_dir, old.work_dir, restart)
            except OSError as exc:
                log.warning("restart_pending_note_failed", path=str(new.work_dir), error=str(exc))
        failed: list[str] = []
        if any(k.startswith("log.") for k in live):
            configure_logging(merged.log.level, merged.log.format)
        if any(k.startswith("metrics.") for k in live):
            self.metrics.stop()
            try:
                self._start_metrics()
            except WatcherError as exc:
                # the old endpoint again, and the old keys kept: the next SIGHUP tries anew
                failed = sorted(k for k in live if k.startswith("metrics."))
                live -= set(failed)
                self.cfg = self.ingest.cfg = merged = dataclasses.replace(merged, metrics=old.metrics)
                log.error(
                    "metrics_restart_failed", error=str(exc), kept=f"{old.metrics.host}:{old.metrics.port}"
                )
                try:
                    self._start_metrics()
                except WatcherError as again:
                    log.error("metrics_restart_failed", error=str(again), kept="nothing: metrics are off")
                    self.metrics = metrics.NoMetrics()
            if self.predictor is not None:
                self.metrics.set_model(self.predictor.version)
        if any(k.startswith("review.") for k in live):
            page = merged.review_page
            self.review = ReviewPage(page, merged, max_rows=merged.review.max_rows) if page else None
        # a change still waiting for a restart is worth an operator's attention
        (log.warning if restart or failed else log.info)(
            "config_reloaded",
            changed=sorted(live),
            needs_restart=restart,
            failed=failed,
            for_the_listener=listener,
        )

    def _serving(self, predictor: Predictor) -> None:
        """What goes with a newly served version: population, explainer, drift reference, metric label."""
        self.metrics.set_model(predictor.version)
        self._drift, self._drift_message = None, ""
        try:
            metrics_json = model_store.read_json(
                self.cfg.model_store, predictor.version, model_store.METRICS_FILE
            )
        except ModelStoreError:
            metrics_json = None
        reason = "the version records no validation score distribution"
        try:
            reference = drift.reference_from_metadata(predictor.metadata, metrics_json)
            self._drift = drift.DriftMonitor(reference) if reference is not None else None
        except (ValueError, TypeError, KeyError) as exc:  # a stored reference of another shape
            reason = f"its validation_reference is unusable: {exc}"
        if self._drift is None:
            log.warning("drift_monitor_off", model_version=predictor.version, reason=reason)
        try:
            self._population = population_of(predictor.metadata)
        except (ValueError, TypeError) as exc:
            log.error("intended_population_unreadable", model_version=predictor.version, error=str(exc))
            self._population = population_of({})
        self._explainer = None
        if self.cfg.explain.enabled and predictor.onnx is not None:
            self._explainer = predictor.onnx  # maps from the same ONNX Runtime pass
        elif self.cfg.explain.enabled:
            from watcher.explain import ExplainError, GradCam

            try:
                self._explainer = GradCam(predictor.model)
                spec = predictor.spec
                self._explainer.predict_and_explain(
                    np.zeros((1, spec.height, spec.width, 1), np.float32), upsample=False
                )
            except Exception as exc:  # ExplainError, or a model Grad-CAM cannot run: rows without maps
                self._explainer = None
                error = str(exc) if isinstance(exc, ExplainError) else f"{type(exc).__name__}: {exc}"
                log.error("heatmaps_unavailable", model_version=predictor.version, error=error)

    def _wants_onnx(self) -> bool:
        return runtime.wants_onnx(self.cfg.runtime, self._device.get("device"))

    def _prepare(self, predictor: Predictor) -> None:
        """Make ``predictor`` ready to serve (``Predictor.prepare``: ONNX Runtime where wanted and
        possible, from the version's ``model.onnx`` without TensorFlow where it has a usable one,
        else TensorFlow). Raises ``ModelStoreError`` for a model that cannot be loaded, before
        it is served."""
        # the cores the decoding threads leave: on 2 cores, one thread for the model (which
        # measured 229 images/s with heat maps and 284 without, against 205 and 274 with two)
        threads = max(1, runtime.usable_cores() - self.cfg.decode.workers)
        predictor.prepare(
            self.cfg.runtime,
            self._device.get("device"),
            self.cfg.explain.enabled,
            threads,
            self._configure_tensorflow,
        )

    def _configure_tensorflow(self) -> None:
        """TensorFlow's pools set (and it imported) before it loads a model; idempotent."""
        self._device.update(runtime.configure_tensorflow())

    def _score(self, predictor: Predictor, good: list[Item]) -> tuple[list[Prediction], list[Any]]:
        """Predictions for decoded items, with their Grad-CAM maps when heat maps are on."""
        inputs = [i.model_input for i in good if i.model_input is not None]
        if not inputs:
            return [], []
        batch = np.stack(inputs).astype(np.float32, copy=False)
        if self._explainer is not None:
            try:
                # maps on the last block's grid: overlay_png resizes them onto the thumbnail
                raw, cams = self._explainer.predict_and_explain(batch, upsample=False)
                return predictor.predictions(raw), list(cams)
            except Exception as exc:  # heat maps never fail a row
                log.error("heatmap_failed", error=f"{type(exc).__name__}: {exc}", n_files=len(good))
        return predictor.predictions(predictor.raw_probabilities(batch)), [None] * len(inputs)

    def _infer(self, items: list[Item], held: Scored | None = None) -> Scored:
        """Stage 2: predictions (and Grad-CAM maps) for a decoded batch, with what goes with them.

        ``held``: an earlier batch whose borderline files were decoded again in full; they are
        scored in the same pass as ``items`` (one pass instead of two) and their answers
        replaced in ``held``. This batch's own borderline files are decoded again here and
        left in ``second_look`` for the next pass.
        """
        predictor = held.predictor if held is not None else self.predictor
        assert predictor is not None
        t0 = time.monotonic()
        fresh = [i for i in items if not i.known_destination]
        for item in fresh:  # decoded under an older model's spec: decode again (still claimed)
            if not item.error and item.spec != predictor.spec:
                self._load(item, predictor.spec, self.cfg.decode.max_file_mb << 20)
        good = [i for i in fresh if not i.error]
        owed = held.second_look if held is not None else []
        predictions, cams = self._score(predictor, good + owed)
        if held is not None:
            for item, pred, cam in zip(owed, predictions[len(good) :], cams[len(good) :], strict=True):
                held.predictions[id(item)] = pred
                if cam is not None:
                    held.cams[id(item)] = cam
                item.model_input = None
            log.debug("second_look", n_files=len(owed), n_scored_with=len(good))
            held.second_look, held.n_second_look = [], len(owed)
        predictions, cams = predictions[: len(good)], cams[: len(good)]
        full = second_look_inputs(
            good,
            [p.probability for p in predictions],
            predictor.spec,
            self.cfg.decode,
            self.cfg.dicom.accept_any_body_part,
        )
        for k, item in enumerate(good):
            item.model_input = full.get(k)  # the full decode's, scored in the next pass; else freed
        again = [good[k] for k in full]
        return Scored(
            items=items,
            predictor=predictor,
            predictions={id(i): p for i, p in zip(good, predictions, strict=True)},
            cams={id(i): c for i, c in zip(good, cams, strict=True) if c is not None},
            population=self._population,
            drift=self._drift,
            started=t0,
            infer_s=time.monotonic() - t0,
            second_look=again,
        )

    def _report(self, batch: Scored) -> None:
        """Stage 3: heat maps, rows (one append), moves (one fsync per folder), page, drift."""
        predictor, items, scored = batch.predictor, batch.items, batch.predictions
        cfg = self.cfg  # one configuration for the whole batch, even if a SIGHUP swaps it
        t0 = batch.started
        infer_ms = batch.infer_s * 1000
        fresh = [i for i in items if not i.known_destination]
        jobs = [(i, scored[id(i)], batch.cams[id(i)]) for i in fresh if id(i) in batch.cams]
        heatmaps = self._heatmaps.write(jobs, predictor.threshold) if jobs else {}
        rows: list[ResultRow] = []
        moves: list[tuple[Item, Path]] = []
        n_warnings = 0
        # two files of one name in a batch (claimed apart) must not plan the same destination:
        # the second would be moved elsewhere, and its row would name the first one's file
        planned = self._owed | {Path(i.known_destination) for i in items if i.known_destination}
        for item in fresh:
            now = datetime.now(timezone.utc)
            pred = scored.get(id(item))
            base = cfg.processed if pred else cfg.failed
            root = destination_root(base, pred.label if pred else None, cfg.filing.layout, now)
            dest = plan_destination(root, item.rel, item.sha256 or "0" * 8, planned)
            planned.add(dest)
            h, w = (str(item.height), str(item.width)) if item.height else ("", "")
            warning = population_warning(item.age_years, item.age_text, batch.population) if pred else ""
            n_warnings += bool(warning)
            rows.append(
                ResultRow(
                    processed_at=format_utc(now),
                    file=str(item.rel),
                    sha256=item.sha256,
                    status="ok" if pred else "failed",
                    label=pred.label if pred else "",
                    probability=f"{pred.probability:.6f}" if pred else "",
                    threshold=f"{predictor.threshold:.6f}",
                    model_version=predictor.version,
                    destination=str(dest),
                    error=item.error,
                    width=str(w),
                    height=str(h),
                    bytes=str(item.size),
                    instance=cfg.instance_id,
                    claim=item.claim_dir.name if item.claim_dir else "",
                    study_instance_uid=item.study_instance_uid,
                    series_instance_uid=item.series_instance_uid,
                    sop_instance_uid=item.sop_instance_uid,
                    warning=warning,
                    heatmap=heatmaps.get(id(item), ""),
                )
            )
            moves.append((item, dest))
            item.thumb = None
        for item in items:
            if item.known_destination:
                moves.append((item, Path(item.known_destination)))
        self._retry("results_append_failed", lambda: self.results.append(rows))
        failpoints.hit("rows_written")
        self._place_all(moves)
        self._owed -= {Path(i.known_destination) for i in items if i.known_destination}
        n_ok = sum(1 for r in rows if r.status == "ok")
        self._last_batch_at = time.time()
        self.metrics.observe_batch(
            n_ok,
            len(rows) - n_ok,
            time.monotonic() - t0,
            batch.infer_s / max(1, len(scored)),
            [i.decode_s for i in fresh],
            n_second_look=batch.n_second_look,
        )
        self.counts["ok"] += n_ok
        self.counts["failed"] += len(rows) - n_ok
        self.counts["batches"] += 1
        self.counts["warnings"] += n_warnings
        review = self.review  # a SIGHUP may replace it meanwhile
        if review is not None:
            review.add(rows)
            review.maybe_write(predictor)
        if batch.drift is not None and scored:
            report = batch.drift.update(np.array([p.probability for p in scored.values()]))
            if report is not None:
                fields = report.to_fields()
                if batch.drift is self._drift:  # not a version swapped out meanwhile
                    self._drift_message = str(fields.get("message", "score drift"))
                log.warning("score_drift", model_version=predictor.version, **fields)
        log.info(
            "batch_done",
            n_files=len(items),
            n_ok=n_ok,
            n_failed=len(rows) - n_ok,
            n_refiled=len(items) - len(fresh),
            n_population_warnings=n_warnings,
            n_second_look=batch.n_second_look,
            infer_ms=round(infer_ms, 1),
            total_ms=round((time.monotonic() - t0) * 1000, 1),
            model_version=predictor.version,
        )

    def _place_all(self, moves: list[tuple[Item, Path]]) -> None:
        """Link every file at its destination, make the links durable, then drop the claims.

        One fsync per destination folder per batch (not two per file): a crash before the
        unlinks leaves each file claimed and already linked, which recovery recognises.
        """
        folders: set[Path] = set()
        for item, dest in moves:
            used = self._retry("file_move_failed", lambda i=item, d=dest: self._link(i, d))  # type: ignore[misc]
            if used is not None:
                folders.add(used.parent)
        for folder in sorted(folders):
            self._retry("file_move_failed", lambda f=folder: fsync_dir(f))  # type: ignore[misc]
        for item, _ in moves:
            if os.path.lexists(item.path):
                failpoints.hit("linked")
                self._retry("file_move_failed", lambda i=item: i.path.unlink(missing_ok=True))  # type: ignore[misc]
            failpoints.hit("placed")
            if item.claim_dir is not None:
                _prune_empty(item.path.parent, self.claim_root)

    def _link(self, item: Item, dest: Path) -> Path | None:
        """Link the claimed file at ``dest``; returns where it is linked (None: moved already)."""
        if not os.path.lexists(item.path):
            return None  # a crash after the unlink: only the claim folder was left
        try:
            link_into(item.path, dest)
            return dest
        except FileExistsError:
            pass
        mine = os.lstat(item.path)
        if _same_file(item.path, mine, dest):
            return dest  # a crash after the link, before the unlink: already there
        if mine.st_nlink > 1:  # a crash after linking under a re-planned name (below)
            for entry in os.scandir(dest.parent):
                if os.path.samestat(mine, entry.stat(follow_symlinks=False)):
                    return Path(entry.path)
        # another instance took the name between plan and move (shared inbox):
        # keep both files; the row names the planned path, the log the real one
        other = plan_destination(dest.parent, PurePosixPath(dest.name), item.sha256 or "0" * 8)
        log.warning("destination_taken", file=str(item.rel), planned=str(dest), used=str(other))
        link_into(item.path, other)
        return other

    def _retry(self, event: str, action: Callable[[], T]) -> T:
        """Run ``action`` until it succeeds, backing off; files stay claimed meanwhile."""
        delay = 1.0
        while True:
            try:
                return action()
            except (OSError, ReportError) as exc:
                log.error(event, error=str(exc), retry_in_s=delay)
                self._reporter_beat = time.monotonic() + delay  # waiting on purpose, not wedged
                if self._stop_taking.wait(delay):
                    # stopping: the claims stay; recovery at the next start finishes them
                    raise WatcherError(f"gave up on shutdown after: {exc}") from exc
                delay = min(delay * 2, _MAX_BACKOFF_S)


def _same_file(src: Path, src_stat: os.stat_result, dest: Path) -> bool:
    """Whether ``dest`` is ``src`` already: the same inode, or a finished cross-device copy."""
    try:
        other = os.lstat(dest)
    except FileNotFoundError:
        return False
    if os.path.samestat(src_stat, other):
        return True
    if src_stat.st_dev == other.st_dev or stat.S_IFMT(src_stat.st_mode) != stat.S_IFMT(other.st_mode):
        return False
    if stat.S_ISLNK(src_stat.st_mode):
        return os.readlink(src) == os.readlink(dest)
    return stat.S_ISREG(src_stat.st_mode) and filecmp.cmp(src, dest, shallow=False)


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) ``stop``."""
    while folder != stop and stop in folder.parents:
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty (other files of the batch), or gone
        folder = folder.parent


def _through_link(inbox: Path, path: Path) -> bool:
    """Whether a folder between ``inbox`` and ``path`` is a symbolic link (never follow one)."""
    folder = path.parent
    while folder != inbox and inbox in folder.parents:
        if folder.is_symlink():
            return True
        folder = folder.parent
    return False


def _fingerprint(folder: Path) -> tuple[Any, ...]:
    """What changes when a version folder's files do (contents, modes, a folder made anew)."""
    try:
        entries = [folder, *sorted(folder.iterdir())]
    except OSError as exc:
        return (str(exc),)
    out: list[Any] = []
    for path in entries:
        try:
            st = path.stat()
        except OSError as exc:
            out.append((path.name, str(exc)))
            continue
        out.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))
    return tuple(out)


def _not_served(wanted: str | None, why: object, serving: str) -> str:
    """``status``'s DEGRADED reason: CURRENT's version (None: CURRENT itself) cannot serve."""
    what = f"CURRENT names {wanted}, which does not load" if wanted else "CURRENT cannot be used"
    return f"{what} ({why}); serving {serving}"
