"""The daemon: ingest -> claim -> decode -> batch -> infer -> report -> file.

Order of operations for one file (see README "Guarantees"):

1. **claim**: ``os.rename`` from the inbox into ``inbox/.xray-watcher/<instance>/claimed/<id>/<rel>``.
   Only one process can win the rename, so two instances never take the same file.
2. **read + decode + preprocess** in a worker thread (only claimed files are read).
3. **predict** the batch; **plan** each destination (a free name, never an existing one).
4. **append** the batch's rows to results.csv (one write, fsync).
5. **place** each file at its destination (link + unlink; never overwrite), then drop its claim folder.

A crash leaves files only in the claim folder; at start-up ``recover`` re-files those whose
row is already in results.csv (same relative path and sha256) and re-processes the others,
so each file gets exactly one row and ends in exactly one place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import structlog

from watcher import failpoints, model_store, systemd
from watcher.batching import collect_batch
from watcher.config import Config
from watcher.errors import DecodeError, ModelStoreError, ReportError, WatcherError
from watcher.filing import place, plan_destination
from watcher.imaging import GreyImage, ModelInput, PreprocessSpec, decode_bytes, preprocess
from watcher.inference import Predictor
from watcher.ingest import Ingest
from watcher.report import ResultRow, ResultsWriter, read_rows, utc_now

log = structlog.get_logger()

CLAIMED = "claimed"
_MAX_BACKOFF_S = 60.0


@dataclass
class Item:
    """One file on its way through the pipeline."""

    rel: PurePosixPath  # path relative to the inbox, as reported
    path: Path  # where the file is now (its claim, or the user's path for ``predict``)
    sha256: str = ""
    size: int = 0
    image: GreyImage | None = None
    model_input: ModelInput | None = None
    spec: PreprocessSpec | None = None
    error: str = ""
    known_destination: str = ""  # recovery: the row exists already, only the move is owed
    claim_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


def load_item(item: Item, spec: PreprocessSpec, max_pixels: int, max_bytes: int) -> Item:
    """Hash, decode and preprocess one item in place; failures go to ``item.error``."""
    try:
        data = read_file(item.path, max_bytes)
        item.size = len(data)
        item.sha256 = hashlib.sha256(data).hexdigest()
        item.image = decode_bytes(data, max_pixels)
        item.model_input = preprocess(item.image, spec)
        item.spec = spec
        failpoints.hit("decoded")
    except DecodeError as exc:
        item.error = str(exc)
        if not item.sha256 and item.path.is_symlink():
            item.sha256 = hashlib.sha256(os.fsencode(os.readlink(item.path))).hexdigest()
    except Exception as exc:  # isolation: one odd file must never stop the service
        log.exception("decode_unexpected_error", file=str(item.rel))
        item.error = f"unexpected error while decoding: {type(exc).__name__}: {exc}"
    return item


class InstanceLock:
    """An exclusive lock on this instance's work folder: one daemon per instance id."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WatcherError(
                f"another xray-watcher with the same instance_id already works on this inbox "
                f"(lock {self.path} is held); give each instance its own instance_id"
            ) from None
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
        self.results = ResultsWriter(cfg.results)
        self.predictor = predictor
        self._lock = InstanceLock(cfg.work_dir)
        self._stop_taking = threading.Event()  # SIGTERM: take no new files
        self._input_done = threading.Event()  # --once: nothing more will arrive
        self._no_more_input = threading.Event()  # either of the two: stop waiting for files
        self._reload_now = threading.Event()  # SIGHUP
        self._decoded: queue.Queue[list[Item] | None] = queue.Queue(maxsize=2)
        self._recovered: list[Item] = []
        self._bad_versions: set[str] = set()
        self._last_model_check = time.monotonic()
        self.counts = {"ok": 0, "failed": 0, "batches": 0, "recovered": 0}

    # ------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop taking files; finish what is claimed; then ``run`` returns."""
        self._stop_taking.set()
        self._no_more_input.set()

    def request_reload(self) -> None:
        """Check the model store for a new current version now."""
        self._reload_now.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads the model (main thread only)."""

        def on_stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            log.info("signal_received", signal="SIGHUP")
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def run(self, once: bool = False, on_ready: Callable[[], None] | None = None) -> int:
        """Process the inbox; with ``once`` return when it is empty, else run until stopped."""
        self._lock.acquire()
        try:
            self.results.open()
            if self.predictor is None:
                self.predictor = Predictor(self.cfg.model_store)
            log.info(
                "model_loaded",
                model_version=self.predictor.version,
                threshold=self.predictor.threshold,
                architecture=self.predictor.metadata.get("architecture"),
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
            if on_ready is not None:
                on_ready()
            self._infer_loop()
            systemd.notify("STOPPING=1")
            decoder.join()
        finally:
            self.ingest.stop()
            self._lock.release()
        log.info(
            "stopped",
            files_ok=self.counts["ok"],
            files_failed=self.counts["failed"],
            batches=self.counts["batches"],
            recovered=self.counts["recovered"],
            rows_written=self.results.rows_written,
        )
        return 0

    def _feed_once(self) -> None:
        """--once: everything in the inbox now, each file once it has settled."""
        self.ingest.rescan()
        while not self._stop_taking.is_set():
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
        done = {
            row["claim"]: row["destination"]
            for row in read_rows(self.cfg.results)
            if row.get("claim") in claimed and row.get("instance") == self.cfg.instance_id
        }
        for claim_dir in claim_dirs:
            files = [Path(r) / f for r, _, fs in os.walk(claim_dir) for f in fs]
            if not files:
                shutil.rmtree(claim_dir, ignore_errors=True)
                continue
            for path in files:
                rel = PurePosixPath(path.relative_to(claim_dir).as_posix())
                item = Item(rel=rel, path=path, claim_dir=claim_dir)
                item.known_destination = done.get(claim_dir.name, "")
                self._recovered.append(item)
        self.counts["recovered"] = len(self._recovered)
        log.warning(
            "recovering_claimed_files",
            n_files=len(self._recovered),
            already_reported=sum(1 for i in self._recovered if i.known_destination),
        )

    # ------------------------------------------------------------ stage 1: claim + decode

    def _claim(self, path: Path) -> Item | None:
        try:
            rel = PurePosixPath(path.relative_to(self.cfg.inbox).as_posix())
        except ValueError:
            return None
        claim_dir = self.claim_root / uuid.uuid4().hex
        target = claim_dir.joinpath(*rel.parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            failpoints.hit("claimed")
        except FileNotFoundError:
            shutil.rmtree(claim_dir, ignore_errors=True)  # taken by another instance, or gone
            return None
        except OSError as exc:
            shutil.rmtree(claim_dir, ignore_errors=True)
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
                    )
                    if not paths:
                        break  # empty only once no more input will come
                    items = []
                    for path in paths:
                        item = self._claim(path)
                        self.ingest.done(path)
                        if item is not None:
                            items.append(item)
                    if items:
                        self._decode_batch(pool, items, max_bytes)
        except Exception:
            log.exception("decoder_crashed")
            self.request_stop()
        finally:
            self._decoded.put(None)

    def _decode_batch(self, pool: ThreadPoolExecutor, items: list[Item], max_bytes: int) -> None:
        assert self.predictor is not None
        spec = self.predictor.spec
        todo = [i for i in items if not i.known_destination]
        list(pool.map(lambda i: load_item(i, spec, self.cfg.decode.max_pixels, max_bytes), todo))
        self._decoded.put(items)

    # ------------------------------------------------------------ stage 2: infer + report + file

    def _infer_loop(self) -> None:
        # the watchdog is fed from this loop, so a wedged pipeline stops the pings
        ping_every = systemd.watchdog_interval_s()
        last_ping = 0.0
        while True:
            if ping_every is not None and time.monotonic() - last_ping >= ping_every:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()
            try:
                items = self._decoded.get(timeout=0.2)
            except queue.Empty:
                self._maybe_reload()
                continue
            if items is None:
                break
            self._maybe_reload()
            self._finish(items)

    def _maybe_reload(self) -> None:
        due = time.monotonic() - self._last_model_check >= self.cfg.model_poll_s
        if not (due or self._reload_now.is_set()):
            return
        forced = self._reload_now.is_set()
        self._reload_now.clear()
        self._last_model_check = time.monotonic()
        assert self.predictor is not None
        try:
            wanted = model_store.current_version(self.cfg.model_store)
        except ModelStoreError as exc:
            log.error("model_pointer_unreadable", error=str(exc), serving=self.predictor.version)
            return
        if wanted == self.predictor.version or (wanted in self._bad_versions and not forced):
            return
        try:
            new = Predictor(self.cfg.model_store, wanted)
        except ModelStoreError as exc:
            self._bad_versions.add(wanted)
            log.error("model_load_failed", version=wanted, error=str(exc), serving=self.predictor.version)
            return
        log.info(
            "model_swapped",
            previous=self.predictor.version,
            model_version=new.version,
            threshold=new.threshold,
        )
        self.predictor = new

    def _finish(self, items: list[Item]) -> None:
        predictor = self.predictor
        assert predictor is not None
        t0 = time.monotonic()
        fresh = [i for i in items if not i.known_destination]
        good = [i for i in fresh if not i.error]
        for item in good:  # decoded under an older model's spec: redo the cheap part
            if item.spec != predictor.spec and item.image is not None:
                item.model_input = preprocess(item.image, predictor.spec)
        inputs = [i.model_input for i in good if i.model_input is not None]
        predictions = predictor.predict(inputs)
        infer_ms = (time.monotonic() - t0) * 1000
        rows: list[ResultRow] = []
        moves: list[tuple[Item, Path]] = []
        by_item = dict(zip((id(i) for i in good), predictions, strict=True))
        for item in fresh:
            pred = by_item.get(id(item))
            root = self.cfg.processed / pred.label if pred else self.cfg.failed
            dest = plan_destination(root, item.rel, item.sha256 or "0" * 8)
            h, w = item.image.shape if item.image is not None else ("", "")
            rows.append(
                ResultRow(
                    processed_at=utc_now(),
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
                    instance=self.cfg.instance_id,
                    claim=item.claim_dir.name if item.claim_dir else "",
                )
            )
            moves.append((item, dest))
            item.image = item.model_input = None  # free memory early
        for item in items:
            if item.known_destination:
                moves.append((item, Path(item.known_destination)))
        self._retry("results_append_failed", lambda: self.results.append(rows))
        failpoints.hit("rows_written")
        for item, dest in moves:
            self._retry("file_move_failed", lambda i=item, d=dest: self._place(i, d))  # type: ignore[misc]
            failpoints.hit("placed")
        n_ok = sum(1 for r in rows if r.status == "ok")
        self.counts["ok"] += n_ok
        self.counts["failed"] += len(rows) - n_ok
        self.counts["batches"] += 1
        log.info(
            "batch_done",
            n_files=len(items),
            n_ok=n_ok,
            n_failed=len(rows) - n_ok,
            n_refiled=len(items) - len(fresh),
            infer_ms=round(infer_ms, 1),
            total_ms=round((time.monotonic() - t0) * 1000, 1),
            model_version=predictor.version,
        )

    def _place(self, item: Item, dest: Path) -> None:
        if os.path.lexists(item.path):
            try:
                place(item.path, dest)
            except FileExistsError:
                if os.path.lexists(dest) and os.path.samestat(os.lstat(item.path), os.lstat(dest)):
                    os.unlink(item.path)  # a crash after link, before unlink: already there
                else:
                    # another instance took the name between plan and move (shared inbox):
                    # keep both files; the row names the planned path, the log the real one
                    other = plan_destination(dest.parent, PurePosixPath(dest.name), item.sha256 or "0" * 8)
                    log.warning("destination_taken", file=str(item.rel), planned=str(dest), used=str(other))
                    place(item.path, other)
        if item.claim_dir is not None:
            shutil.rmtree(item.claim_dir, ignore_errors=True)

    def _retry(self, event: str, action: Callable[[], None]) -> None:
        """Run ``action`` until it succeeds, backing off; files stay claimed meanwhile."""
        delay = 1.0
        while True:
            try:
                action()
                return
            except (OSError, ReportError) as exc:
                log.error(event, error=str(exc), retry_in_s=delay)
                if self._stop_taking.wait(delay):
                    # stopping: the claims stay; recovery at the next start finishes them
                    raise WatcherError(f"gave up on shutdown after: {exc}") from exc
                delay = min(delay * 2, _MAX_BACKOFF_S)
