"""Helpers of the robustness tests: real `run --once` processes, real inputs, the invariants.

The invariant of issue 4: every inbox file (known by the sha256 of its bytes) has exactly one
results.csv row and exists in exactly one place under processed/ or failed/, with the same
bytes, at the path its row names; nothing is left in the inbox or in a claim folder; and the
CSV parses with both pandas and the csv module.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import structlog

from watcher.config import Config


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop_file_mode_override() -> None:  # pragma: no cover - runs in the child before exec
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set: root obeys file modes
    (``preexec_fn`` of a child that must meet a file it may not read or a folder it may not write)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_once(
    cfg: Config,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m watcher run --once --config ...` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", "run", "--once", "--config", str(cfg.source)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def _inotify_watch_lines(pid: int) -> Iterator[str]:
    """The 'inotify wd:' line of each watch a process holds, over all its inotify descriptors."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue  # closed meanwhile
        yield from (line for line in info.splitlines() if line.startswith("inotify wd:"))


def inotify_watches(pid: int) -> int:
    """How many inotify watches a process holds (/proc fdinfo)."""
    return sum(1 for _ in _inotify_watch_lines(pid))


def inotify_masks(pid: int) -> list[int]:
    """The event mask of each inotify watch a process holds, in no set order."""
    masks = []
    for line in _inotify_watch_lines(pid):
        fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
        masks.append(int(fields["mask"], 16))
    return masks


class _GatedLogger:
    """A structlog logger whose every call waits for ``gate``."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def msg(self, message: str) -> None:
        self.gate.wait()

    log = debug = info = warning = error = critical = exception = msg


@contextlib.contextmanager
def log_output_held() -> Iterator[None]:
    """Inside: every structlog call blocks until the block ends, as it would for a thread
    that found the log's write lock held."""
    saved = structlog.get_config()
    gate = threading.Event()
    structlog.configure(logger_factory=lambda *args: _GatedLogger(gate))
    try:
        yield
    finally:
        gate.set()
        structlog.configure(**saved)


def returns_within(fn: Callable[..., object], args: tuple[object, ...], timeout: float) -> bool:
    """Whether ``fn(*args)``, run in a thread, returns within ``timeout`` seconds."""
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def png_bytes(seed: int, size: int = 48, level: int | None = None) -> bytes:
    """A small distinct PNG (random grey noise, or a flat image of ``level``)."""
    rng = np.random.default_rng(seed)
    if level is None:
        img = rng.integers(0, 256, (size, size), dtype=np.uint8)
    else:
        img = np.full((size, size), level, dtype=np.uint8)
        img[0, :4] = [seed >> 24 & 255, seed >> 16 & 255, seed >> 8 & 255, seed & 255]
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return bytes(buf.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return len(payload).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small, well-formed PNG that declares ``width`` x ``height`` 8-bit grey pixels."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # the first 64 rows of zeros
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def read_csv_both(path: Path) -> list[dict[str, str]]:
    """The rows via the csv module, after checking pandas reads the same number and columns."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(rows) == len(frame), "pandas and the csv module disagree on the number of rows"
    assert list(frame.columns) == list(csv.DictReader(io.StringIO(text)).fieldnames or [])
    assert list(frame["file"]) == [r["file"] for r in rows]
    assert text.endswith("\n"), "results.csv ends in a torn line"
    return rows


def placed_files(cfg: Config) -> dict[Path, bytes]:
    """Every file (or link, or FIFO) under processed/ and failed/, with its bytes (link: its target)."""
    out: dict[Path, bytes] = {}
    for root in (cfg.processed, cfg.failed):
        for dirpath, dirs, names in os.walk(root):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                path = Path(dirpath) / name
                if path.is_symlink():
                    out[path] = os.fsencode(os.readlink(path))
                elif path.is_file():
                    out[path] = path.read_bytes()
                else:
                    out[path] = b""  # a FIFO or other special file: no bytes to compare
    return out


def leftovers(cfg: Config) -> list[Path]:
    """Files still in the inbox (outside hidden names) or in a claim folder."""
    left = []
    for dirpath, dirs, names in os.walk(cfg.inbox):
        rel = Path(dirpath).relative_to(cfg.inbox)
        hidden = any(part.startswith(".") for part in rel.parts)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            in_claims = "claimed" in rel.parts and ".xray-watcher" in rel.parts
            if in_claims or not (hidden or name.startswith(".")):
                left.append(Path(dirpath) / name)
    return left


def check_exactly_once(cfg: Config, originals: dict[str, bytes]) -> list[dict[str, str]]:
    """The invariant above, for ``originals`` = sha256 -> bytes of every file put in the inbox."""
    rows = read_csv_both(cfg.results)
    by_sha: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_sha.setdefault(row["sha256"], []).append(row)
    assert set(originals) == set(by_sha), "rows for unknown files, or files without a row"
    dupes = {s: [r["file"] for r in rs] for s, rs in by_sha.items() if len(rs) != 1}
    assert {} == dupes, "files with more than one row"
    placed = placed_files(cfg)
    where: dict[str, list[Path]] = {}
    for path, data in placed.items():
        where.setdefault(sha(data), []).append(path)
    for digest, data in originals.items():
        assert 1 == len(where.get(digest, [])), f"{by_sha[digest][0]['file']!r} is in {where.get(digest)}"
        (path,) = where[digest]
        assert data == placed[path]
        assert str(path) == by_sha[digest][0]["destination"]
    assert len(originals) == len(placed), "extra files under processed/ or failed/"
    assert [] == leftovers(cfg)
    claim_root = cfg.work_dir / "claimed"
    assert [] == (sorted(claim_root.iterdir()) if claim_root.exists() else []), "claim folders left"
    return rows


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``mnt`` (needs root and mount; skips with the reason otherwise)."""
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Daemon:
    """A real `python -m watcher run` subprocess with its JSON log lines."""

    def __init__(self, cfg: Config, env: dict[str, str] | None = None, once: bool = False) -> None:
        self.cfg = cfg
        self.lines: list[dict[str, object]] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watcher",
                "run",
                "--config",
                str(cfg.source),
                *(["--once"] if once else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"event": "raw", "text": line})

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.lines if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 120) -> None:
        """Wait for a log event; on timeout, fail with the process's state and its last lines."""
        try:
            wait_for(lambda: bool(self.events(name)), timeout, f"the daemon's {name!r} event")
        except AssertionError as exc:
            tail = "\n".join(json.dumps(e)[:300] for e in self.lines[-25:])
            raise AssertionError(f"{exc}; exit code {self.proc.poll()}; last lines:\n{tail}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # leave no wedged daemon behind the failing test
            self.proc.wait()
            raise
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


def notify_address() -> tuple[str, str]:
    """A fresh abstract AF_UNIX address for a test's notify socket: what to bind, and the
    ``NOTIFY_SOCKET`` value naming it (``@name``). A path under ``tmp_path`` can pass the
    108-byte limit of socket paths when ``$TMPDIR`` is long."""
    import uuid

    name = f"xray-watcher-test-{uuid.uuid4().hex}"
    return "\0" + name, "@" + name
