"""The daemon's state file and ``xray-watcher status``.

The daemon rewrites ``<inbox>/.xray-watcher/<instance>/status.json`` (``Config.status_file``)
every tick with ``StatusWriter.write`` (temp file + rename: a reader never sees half a file).
``xray-watcher status`` reads it back: a daemon is *running* when the instance lock
(``<work_dir>/lock``) is held, and *healthy* when the state file is the lock holder's (its pid
alive and the one the holder wrote into the lock file), its last tick is recent and it serves
the version the model store's CURRENT names (else *degraded*: ``model_problem`` says why). A held lock
with no state file, or with an earlier daemon's (a restart: the new one is loading its model),
is *starting*: running, not yet healthy.
``summary_line`` is the one-line ``STATUS=`` shown by ``systemctl status``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from watcher import __version__
from watcher.config import Config
from watcher.filing import folder_size

DEFAULT_TICK_S = 5.0  # how often the daemon rewrites the state file
STALE_TICKS = 3  # no tick for this many intervals: stale
DISK_USAGE_EVERY_S = 300.0  # walking processed/ can be slow: at most this often

State = dict[str, Any]


def iso_utc(t: float | None) -> str | None:
    """Epoch seconds as ``2024-05-01T12:03:04Z`` (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_utc(text: object) -> float | None:
    """The inverse of ``iso_utc``; None for anything that is not such a time."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


class StatusWriter:
    """Atomic rewrites of one JSON state file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def write(self, state: Mapping[str, Any]) -> None:
        """Replace the file with ``state`` (temp file + rename; no fsync: it is rewritten soon)."""
        data = (json.dumps(state, indent=2, sort_keys=True, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)

    def remove(self) -> None:
        """Delete the state file (a clean shutdown), and any temp file left."""
        for p in (self.path, self._tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def read_status(path: Path) -> State:
    """The state last written to ``path``; raises OSError or ValueError if unreadable."""
    state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state


def results_bytes(results: Path) -> int:
    """Size of results.csv and its rotated siblings (``results*.csv`` beside it)."""
    total = 0
    for p in results.parent.glob(f"{results.stem}*{results.suffix}"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


WALK_BUDGET_S = 10.0


class DiskUsage:
    """Sizes of results, processed/ and failed/ for the state file, measured in the background.

    ``current()`` never walks a folder itself: it returns the last measurement (None before
    the first one ends) and starts a new one in a thread when the last is older than
    ``every_s``. Free space is cheap (one ``statvfs``) and is fresh every call.
    """

    def __init__(
        self, results: Path, processed: Path, failed: Path, every_s: float = DISK_USAGE_EVERY_S
    ) -> None:
        self.results = results
        self.processed = processed
        self.failed = failed
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None
        self._measured = -float("inf")  # monotonic time the last walk started
        self._thread: threading.Thread | None = None

    @classmethod
    def for_config(cls, cfg: Config, every_s: float = DISK_USAGE_EVERY_S) -> DiskUsage:
        return cls(cfg.results, cfg.processed, cfg.failed, every_s)

    def measure(self) -> dict[str, Any]:
        """Walk the folders now, each for at most ``WALK_BUDGET_S`` (a year of files is millions).

        ``*_complete`` False: the budget ran out and the size is a lower bound.
        """
        processed = folder_size(self.processed, WALK_BUDGET_S)
        failed = folder_size(self.failed, WALK_BUDGET_S)
        return {
            "results_bytes": results_bytes(self.results),
            "processed_bytes": processed.bytes,
            "processed_complete": processed.complete,
            "failed_bytes": failed.bytes,
            "failed_complete": failed.complete,
            "measured_at": iso_utc(time.time()),
        }

    def _refresh(self) -> None:
        usage = self.measure()
        with self._lock:
            self._last = usage

    def current(self, wait: bool = False) -> dict[str, Any]:
        """The latest sizes plus free space; ``wait``: block for a walk that is due (tests)."""
        with self._lock:
            due = time.monotonic() - self._measured >= self.every_s
            busy = self._thread is not None and self._thread.is_alive()
            if due and not busy:
                self._measured = time.monotonic()
                self._thread = threading.Thread(target=self._refresh, name="disk-usage", daemon=True)
                self._thread.start()
            thread = self._thread
        if wait and thread is not None:
            thread.join()
        with self._lock:
            usage: dict[str, Any] = dict(self._last or {})
        try:
            usage["free_bytes"] = shutil.disk_usage(self.results.parent).free
        except OSError:
            usage["free_bytes"] = None
        return usage


def make_state(
    cfg: Config,
    *,
    started_at: float,
    model_version: str,
    files_ok: int,
    files_failed: int,
    queue_depth: int,
    last_batch_at: float | None,
    disk: Mapping[str, Any] | None = None,
    tick_s: float = DEFAULT_TICK_S,
    now: float | None = None,
) -> State:
    """The state file's fields, from what the service counts (times: epoch seconds)."""
    now = time.time() if now is None else now
    return {
        "version": __version__,
        "pid": os.getpid(),
        "instance": cfg.instance_id,
        "config": str(cfg.source) if cfg.source else None,
        "started_at": iso_utc(started_at),
        "uptime_s": round(max(0.0, now - started_at), 1),
        "model_version": model_version,
        "files_ok": files_ok,
        "files_failed": files_failed,
        "queue_depth": queue_depth,
        "last_batch_at": iso_utc(last_batch_at),
        "last_tick_at": iso_utc(now),
        "tick_s": tick_s,
        "disk": dict(disk or {}),
    }


def _count(state: Mapping[str, Any], key: str) -> str:
    value = state.get(key)
    return f"{value:,}" if isinstance(value, int) else "?"


def _clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%SZ")


def summary_line(state: Mapping[str, Any]) -> str:
    """One line for systemd's ``STATUS=``.

    Like "serving v0002 · 1,234 ok · 5 failed · queue 0 · last batch 12:03:04Z".
    """
    last = parse_utc(state.get("last_batch_at"))
    problem = state.get("model_problem")
    return " · ".join(
        ([f"DEGRADED: {problem}"] if problem else [])
        + [
            f"serving {state.get('model_version') or '?'}",
            f"{_count(state, 'files_ok')} ok",
            f"{_count(state, 'files_failed')} failed",
            f"queue {_count(state, 'queue_depth')}",
            f"last batch {_clock(last)}" if last is not None else "no batch yet",
        ]
    )


def stale_after(state: Mapping[str, Any]) -> float:
    """How old the last tick may be before the daemon counts as stale (3 tick intervals)."""
    tick = state.get("tick_s")
    tick_s = float(tick) if isinstance(tick, (int, float)) and tick > 0 else DEFAULT_TICK_S
    return STALE_TICKS * tick_s


def evaluate(state: Mapping[str, Any], now: float, stale_after_s: float) -> tuple[bool, str]:
    """Whether the state is fresh (last tick at most ``stale_after_s`` old), and why in words."""
    tick = parse_utc(state.get("last_tick_at"))
    if tick is None:
        return False, "no tick recorded in the state file"
    age = now - tick
    if age > stale_after_s:
        return False, f"stale: last tick {_ago(age)} ago (limit {stale_after_s:g} s); {summary_line(state)}"
    if state.get("model_problem"):  # scoring, but not with the version CURRENT names
        return False, summary_line(state)
    return True, summary_line(state)


def _ago(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 172_800:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _bytes(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def lock_held(lock: Path) -> bool | None:
    """Whether some process holds the instance lock (None: the file cannot be opened).

    A shared, non-blocking ``flock`` fails only while the daemon holds its exclusive lock;
    if it succeeds it is released at once.
    """
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_pid(lock: Path) -> int | None:
    """The pid the lock holder wrote into the lock file (``InstanceLock``: ``"<pid>\\n"``), if alive.

    None when the file is missing, unreadable, empty (the holder has just truncated it) or names
    no live process.
    """
    try:
        with open(lock, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid_alive(pid) else None


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (one we may not signal counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PENDING_FILE = "restart-pending.json"


def write_pending(new_work_dir: Path, running_work_dir: Path, needs_restart: list[str]) -> None:
    """Leave word where a config file now sends ``status`` (a SIGHUP changed ``inbox`` or
    ``instance_id``, which wait for a restart): this daemon still works in ``running_work_dir``."""
    note = {
        "pid": os.getpid(),
        "work_dir": str(running_work_dir),
        "needs_restart": needs_restart,
        "since": iso_utc(time.time()),
    }
    StatusWriter(new_work_dir / PENDING_FILE).write(note)


def clear_pending(work_dir: Path) -> None:
    """A daemon working in ``work_dir`` now: no earlier one's word is needed there."""
    with contextlib.suppress(FileNotFoundError):
        (work_dir / PENDING_FILE).unlink()


def _pending(work_dir: Path) -> dict[str, Any] | None:
    """A running daemon's word left in ``work_dir`` (``write_pending``), if it still holds."""
    try:
        note = read_status(work_dir / PENDING_FILE)
    except (OSError, ValueError):
        return None
    running = note.get("work_dir")
    if not isinstance(running, str) or not pid_alive(note.get("pid")) or Path(running) == work_dir:
        return None
    return note if lock_held(Path(running) / "lock") else None


def check(cfg: Config, now: float | None = None) -> dict[str, Any]:
    """Everything ``xray-watcher status`` reports, as one dict.

    Where the config file names an inbox or instance id the running daemon does not use yet
    (changed, waiting for a restart), the daemon left word there (``write_pending``): it is
    reported from its own folder, with ``restart_pending``, rather than as not running.
    """
    now = time.time() if now is None else now
    report = _check_at(cfg, cfg.work_dir, now)
    if not report["running"] and (note := _pending(cfg.work_dir)) is not None:
        report = _check_at(cfg, Path(note["work_dir"]), now)
        report["restart_pending"] = note
        keys = ", ".join(str(k) for k in note.get("needs_restart") or []) or "the config"
        report["summary"] = (
            f"restart pending ({keys} changed in the config file; the running daemon, pid "
            f"{note.get('pid')}, still uses its own, in {note['work_dir']}): {report['summary']}"
        )
    return report


def _check_at(cfg: Config, work_dir: Path, now: float) -> dict[str, Any]:
    status_file = work_dir / cfg.status_file.name
    report: dict[str, Any] = {
        "instance": cfg.instance_id,
        "config": str(cfg.source) if cfg.source else None,
        "status_file": str(status_file),
        "running": False,
        "healthy": False,
        "summary": "",
        "state": None,
        "lock_pid": None,  # the lock holder's pid, from the lock file, when it is held and alive
    }
    lock = work_dir / "lock"
    held = lock_held(lock)
    try:
        state: State | None = read_status(status_file)
    except FileNotFoundError:
        state = None
    except (OSError, ValueError) as exc:
        state = None
        report["summary"] = f"cannot read {status_file}: {exc}"
    report["state"] = state
    if held is None:
        report["summary"] = f"cannot open the instance lock {lock} (permission?)"
        return report
    if not held:
        report["summary"] = "not running (the instance lock is free)"
        return report
    report["lock_pid"] = holder = lock_pid(lock)
    since = _lock_age(lock, now) if holder is not None else ""
    by = (
        f"pid {holder} holds the instance lock{since}"
        if holder is not None
        else "a process holds the instance lock"
    )
    if state is None:
        report["running"] = True
        report["summary"] = report["summary"] or f"starting: {by}, no state file yet (loading the model?)"
        return report
    old_pid = state.get("pid")
    if (holder is not None and holder != old_pid) or not pid_alive(old_pid):
        # a restarted daemon before its first tick: the state file is its predecessor's
        report["running"] = True
        report["state"], report["stale_state"] = None, state
        gone = "gone" if not pid_alive(old_pid) else "not the lock holder"
        report["summary"] = (
            f"starting: {by} and has not written its state yet (loading the model?); "
            f"the state file is an earlier daemon's (pid {old_pid}, {gone})"
        )
        return report
    report["running"] = True
    report["healthy"], report["summary"] = evaluate(state, now, stale_after(state))
    return report


def _lock_age(lock: Path, now: float) -> str:
    """`` (taken N s ago)``: when the holder wrote its pid into the lock (at start-up); "" if unknown."""
    try:
        taken = lock.stat().st_mtime
    except OSError:
        return ""
    return f" (taken {_ago(now - taken)} ago)"


def format_report(report: Mapping[str, Any], now: float) -> str:
    """The human form of ``check``'s dict."""
    state: Mapping[str, Any] = report.get("state") or {}
    word = "NOT running"
    if report["running"]:
        word = "healthy" if report["healthy"] else "running, NOT healthy"
    lines = [f"xray-watcher instance {report['instance']!r}: {word}", f"  {report['summary']}"]
    if report["running"] and state:
        started = parse_utc(state.get("started_at"))
        last_batch = parse_utc(state.get("last_batch_at"))
        last_tick = parse_utc(state.get("last_tick_at"))
        disk: Mapping[str, Any] = state.get("disk") or {}
        rows: list[tuple[str, str]] = [
            ("pid", str(state.get("pid"))),
            ("uptime", _ago(now - started) if started is not None else "?"),
            ("model", str(state.get("model_version") or "?")),
            ("files", f"{_count(state, 'files_ok')} ok, {_count(state, 'files_failed')} failed"),
            ("queue", _count(state, "queue_depth")),
            (
                "last batch",
                f"{state.get('last_batch_at')} ({_ago(now - last_batch)} ago)" if last_batch else "none yet",
            ),
            ("last tick", f"{_ago(now - last_tick)} ago" if last_tick is not None else "?"),
        ]
        if state.get("drift"):
            rows.append(("drift", str(state["drift"])))
        if disk:
            sizes = (
                f"results {_bytes(disk.get('results_bytes'))}, "
                f"processed {'' if disk.get('processed_complete', True) else 'at least '}"
                f"{_bytes(disk.get('processed_bytes'))}, "
                f"failed {'' if disk.get('failed_complete', True) else 'at least '}"
                f"{_bytes(disk.get('failed_bytes'))}"
                if "processed_bytes" in disk
                else "sizes not measured yet"
            )
            rows.append(("disk", f"{sizes}; {_bytes(disk.get('free_bytes'))} free"))
        rows.append(("version", str(state.get("version") or "?")))
        lines += [f"  {k:<11}{v}" for k, v in rows]
    elif report["running"] and report.get("lock_pid") is not None:
        lines.append(f"  {'pid':<11}{report['lock_pid']}")
    lines.append(f"  config     {report['config']}")
    return "\n".join(lines)


def cli_main(cfg: Config, as_json: bool, now: Callable[[], float] = time.time) -> int:
    """``xray-watcher status``: print the report; 0 when running and healthy, else 1."""
    t = now()
    report = check(cfg, t)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(format_report(report, t))
    return 0 if report["healthy"] else 1
