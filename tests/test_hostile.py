"""Hostile and odd input: each kind gets a row with a plain-words error, the daemon stays up, nothing is lost.

Also a Hypothesis test of file names through a real run and back out of results.csv, and
a fuzz test of the decoder with mutated bytes of real X-ray files.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tests.conftest import FULLRES, fixture_images
from tests.harness import (
    Daemon,
    bomb_png,
    drop_file_mode_override,
    read_csv_both,
    run_once,
    sha,
    small_tmpfs,
    wait_for,
)
from watcher.config import Config, load_config
from watcher.errors import DecodeError
from watcher.imaging import decode_bytes
from watcher.inference import Predictor
from watcher.service import Service


@pytest.fixture(scope="module")
def predictor(tiny_store_template: Path) -> Predictor:
    return Predictor(tiny_store_template)


def encode(ext: str, img: np.ndarray[Any, Any]) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return bytes(buf.tobytes())


def gradient(height: int, width: int) -> np.ndarray[Any, Any]:
    return np.add.outer(np.arange(height) % 256, np.arange(width) % 256).astype(np.uint8) // 2


GOOD = fixture_images()[0].read_bytes()

# name in the inbox -> expected status, and a phrase of the error ("" for ok rows)
ODD_NAMES = [
    "UPPER.JPG",
    "Mixed.Png",
    "LOUD.JPEG",
    "comma,in,name.jpeg",
    'double"quote".jpeg',
    "single'quote.jpeg",
    "new\nline.jpeg",
    "carriage\rreturn.jpeg",
    "  spaced   name .jpeg",
    "ünïcødé 胸部 X線 📷.jpeg",
    "-leading-dash.jpeg",
    "--help.jpeg",
    "ward 7/2024-01-02/deep/nested.jpeg",
]


class TestHostileInbox:
    def test_every_kind_of_bad_input_is_recorded_and_nothing_is_lost(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """Broken, odd, special and linked files: a row each, plain errors, the daemon up, nothing lost."""
        cfg = make_config(ingest={"settle_ms": 300})
        outside = tmp_path / "outside"
        outside.mkdir()
        secret = outside / "secret.jpeg"
        secret.write_bytes(GOOD)
        secret_stat = secret.stat()
        (outside / "folder").mkdir()
        (outside / "folder" / "inside.jpeg").write_bytes(GOOD)

        expected: dict[str, tuple[str, str]] = {}
        content: dict[str, bytes] = {}

        def put(rel: str, data: bytes, status: str, error: str = "") -> None:
            path = cfg.inbox / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            expected[rel], content[rel] = (status, error), data

        opened: list[str] = []  # inotify: anything that opens a file out there (the daemon must not)
        spy = Observer()
        spy.schedule(_OpenSpy(opened), str(outside), recursive=True)
        spy.start()
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to start watching")
            put("empty.jpg", b"", "failed", "the file is empty (0 bytes)")
            put("truncated.jpeg", FULLRES[0].read_bytes()[:20_000], "failed", "the file is truncated")
            put(
                "random.jpg", b"\x00" + random.Random(1).randbytes(5000), "failed", "not a JPEG, PNG or DICOM"
            )
            put(
                "text.png",
                b"Patient notes, not a picture.\n" * 20,
                "failed",
                "the file is text, not an image",
            )
            put("bomb.png", bomb_png(), "failed", "30000x30000 = 900,000,000 pixels, more than the limit")
            img = cv2.imdecode(np.frombuffer(GOOD, np.uint8), cv2.IMREAD_GRAYSCALE)
            put("deep16.png", encode(".png", img.astype(np.uint16) * 257), "ok")
            put("rgba.png", encode(".png", cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)), "ok")
            put("huge.jpeg", encode(".jpg", gradient(6000, 8000)), "ok")
            for i, rel in enumerate(ODD_NAMES):
                put(rel, GOOD + i.to_bytes(2, "big"), "ok")  # distinct bytes after the end marker
            os.mkfifo(cfg.inbox / "pipe.jpg")
            expected["pipe.jpg"] = ("failed", "not a regular file")
            (cfg.inbox / "escape.jpg").symlink_to(secret)
            expected["escape.jpg"] = ("failed", "symbolic link; links are not followed")
            (cfg.inbox / "folder_link.jpeg").symlink_to(outside / "folder")
            expected["folder_link.jpeg"] = ("failed", "symbolic link; links are not followed")
            (cfg.inbox / "scans").symlink_to(outside / "folder")  # no image name: left alone, not entered
            ignored = {".hidden.jpg", "upload.jpeg.part", "copy.png.tmp", ".dotdir/in.jpeg", "readme.txt"}
            for rel in ignored:
                (cfg.inbox / rel).parent.mkdir(exist_ok=True)
                (cfg.inbox / rel).write_bytes(GOOD)

            wait_for(lambda: len(rows_now(cfg)) >= len(expected), 90, "a row for every file")
            assert d.proc.poll() is None, "the daemon died"
            put("after.jpeg", GOOD + b"after", "ok")  # still working after all that
            wait_for(lambda: len(rows_now(cfg)) >= len(expected), 30, "the row of a later file")
        finally:
            assert 0 == d.stop()
            spy.stop()
            spy.join(5)

        assert [] == opened, "a file outside the inbox was opened through a link"
        rows = read_csv_both(cfg.results)
        assert sorted(expected) == sorted(r["file"] for r in rows)
        for row in rows:
            rel = row["file"]
            status, error = expected[rel]
            assert (rel, status) == (rel, row["status"]), row["error"]
            assert error in row["error"], (rel, row["error"])
            dest = Path(row["destination"])
            root = cfg.processed / row["label"] if status == "ok" else cfg.failed
            assert root / rel == dest, "not filed under its own name and folders"
            if rel == "pipe.jpg":
                assert stat.S_ISFIFO(os.lstat(dest).st_mode)
            elif rel in ("escape.jpg", "folder_link.jpeg"):
                assert dest.is_symlink() and ("0", "") == (row["bytes"], row["width"])  # nothing read
                assert sha(os.fsencode(os.readlink(dest))) == row["sha256"]
            else:
                assert content[rel] == dest.read_bytes()
                assert sha(content[rel]) == row["sha256"]
        by_file = {r["file"]: r for r in rows}
        assert ("8000", "6000") == (by_file["huge.jpeg"]["width"], by_file["huge.jpeg"]["height"])
        assert (GOOD, secret_stat.st_mtime_ns) == (secret.read_bytes(), secret.stat().st_mtime_ns)
        assert (cfg.failed / "escape.jpg").resolve() == secret
        assert GOOD == (outside / "folder" / "inside.jpeg").read_bytes()
        left = {
            p.relative_to(cfg.inbox).as_posix()
            for p in cfg.inbox.rglob("*")
            if ".xray-watcher" not in p.parts and (p.is_symlink() or not p.is_dir())
        }
        assert ignored | {"scans"} == left - {".gitkeep"}  # (emptied subfolders are the user's to keep)
        assert [] == [p for p in (cfg.work_dir / "claimed").rglob("*")]


class _OpenSpy(FileSystemEventHandler):
    def __init__(self, opened: list[str]) -> None:
        self.opened = opened

    def on_opened(self, event: FileSystemEvent) -> None:
        self.opened.append(os.fsdecode(event.src_path))


def rows_now(cfg: Config) -> list[dict[str, str]]:
    from watcher.report import read_rows

    return [dict(r) for r in read_rows(cfg.results)]


class TestOtherDisk:
    def test_special_files_are_filed_to_another_filesystem(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """processed/ and failed/ on another filesystem: a FIFO, links and an image all end up there."""
        with small_tmpfs(tmp_path / "disk", "4m") as disk:
            for name in ("processed", "failed"):
                (disk / name).mkdir()
            cfg = make_config(processed=str(disk / "processed"), failed=str(disk / "failed"))
            (cfg.inbox / "scan.jpeg").write_bytes(GOOD)
            os.mkfifo(cfg.inbox / "pipe.jpg")
            (cfg.inbox / "link.jpg").symlink_to(FULLRES[0])
            (cfg.inbox / "dirlink.png").symlink_to(FULLRES[0].parent)
            proc = run_once(cfg, timeout=60)
            assert 0 == proc.returncode, proc.stderr[-3000:]
            by_file = {r["file"]: r for r in read_csv_both(cfg.results)}
            assert ["ok", "failed", "failed", "failed"] == [
                by_file[n]["status"] for n in ("scan.jpeg", "pipe.jpg", "link.jpg", "dirlink.png")
            ]
            assert GOOD == Path(by_file["scan.jpeg"]["destination"]).read_bytes()
            assert stat.S_ISFIFO(os.lstat(disk / "failed" / "pipe.jpg").st_mode)
            assert str(FULLRES[0]) == os.readlink(disk / "failed" / "link.jpg")
            assert str(FULLRES[0].parent) == os.readlink(disk / "failed" / "dirlink.png")
            assert [] == [p.name for p in cfg.inbox.iterdir() if not p.name.startswith(".")]
            assert [] == [p for p in disk.rglob("*.tmp")]


class TestPermissionDenied:
    def test_unreadable_file_fails_in_plain_words_and_is_kept(
        self, make_config: Callable[..., Config]
    ) -> None:
        """A file the service may not read: 'permission denied' row, moved to failed/ intact."""
        cfg = make_config(ingest={"settle_ms": 0})
        locked = cfg.inbox / "locked.jpeg"
        locked.write_bytes(GOOD)
        locked.chmod(0)
        shutil.copy(fixture_images()[1], cfg.inbox / "open.jpeg")
        # root reads any file; drop that power from the daemon (as a service user would lack it)
        preexec = drop_file_mode_override if os.geteuid() == 0 else None
        try:
            proc = run_once(cfg, preexec_fn=preexec)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot take the read-any-file capability away from a root child here: {exc}")
        assert 0 == proc.returncode, proc.stderr[-3000:]
        by_file = {r["file"]: r for r in read_csv_both(cfg.results)}
        assert {"locked.jpeg", "open.jpeg"} == set(by_file)
        assert "ok" == by_file["open.jpeg"]["status"]
        assert "failed" == by_file["locked.jpeg"]["status"]
        assert "permission denied: the service may not read this file" == by_file["locked.jpeg"]["error"]
        assert cfg.failed / "locked.jpeg" == Path(by_file["locked.jpeg"]["destination"])
        (cfg.failed / "locked.jpeg").chmod(0o600)  # mode 0 kept: a test run by a non-root user reads it now
        assert GOOD == (cfg.failed / "locked.jpeg").read_bytes()
        assert not locked.exists()


NAME = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda s: not s.startswith("."))


class TestNamesRoundTrip:
    @settings(max_examples=50, deadline=None)
    @given(names=st.lists(NAME, min_size=1, max_size=5, unique=True))
    def test_any_file_name_survives_the_csv(
        self, names: list[str], tiny_store_template: Path, predictor: Predictor
    ) -> None:
        """Any file name goes through a real run and comes back out of results.csv unchanged."""
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for folder in ("inbox", "processed", "failed"):
                (root / folder).mkdir()
            raw = {
                "inbox": "inbox",
                "processed": "processed",
                "failed": "failed",
                "results": "results.csv",
                "model_store": str(tiny_store_template),
                "batch": {"max_size": 8, "max_wait_ms": 20},
                "ingest": {"settle_ms": 0},
                "instance_id": "hyp",
                "model_poll_s": 3600,
            }
            (root / "config.yaml").write_text(yaml.safe_dump(raw))
            cfg = load_config(root / "config.yaml")
            files = {f"{name}.png": GOOD + i.to_bytes(2, "big") for i, name in enumerate(names)}
            for rel, data in files.items():
                (cfg.inbox / rel).write_bytes(data)
            assert 0 == Service(cfg, predictor=predictor).run(once=True)
            rows = read_csv_both(cfg.results)
            assert sorted(files) == sorted(r["file"] for r in rows)
            for row in rows:
                assert files[row["file"]] == Path(row["destination"]).read_bytes()
                assert Path(row["destination"]).name == row["file"]


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    buf = bytearray(data)
    kind = rng.choice(["flip", "flip_head", "truncate", "insert", "delete", "duplicate"])
    if kind in ("flip", "flip_head"):
        span = min(len(buf), 600) if kind == "flip_head" else len(buf)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(span)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[rng.randrange(len(buf)) :]
    elif kind == "insert":
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        at = rng.randrange(len(buf))
        del buf[at : at + rng.randint(1, 64)]
    else:
        at = rng.randrange(len(buf))
        buf[at:at] = buf[at : at + rng.randint(1, 256)]
    return kind, bytes(buf)


class TestDecoderFuzz:
    def test_mutated_images_give_decode_error_or_a_valid_image(self) -> None:
        """2,400 mutations of real JPEGs and PNGs: DecodeError or a 2-D uint8 image, nothing else."""
        img = cv2.imdecode(np.frombuffer(GOOD, np.uint8), cv2.IMREAD_GRAYSCALE)
        seeds = [
            fixture_images()[0].read_bytes(),
            fixture_images()[-1].read_bytes(),
            FULLRES[1].read_bytes(),
            encode(".png", img),
            encode(".png", img.astype(np.uint16) * 257),
            encode(".png", cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)),
        ]
        rng = random.Random(4)
        surprises = []
        decoded = 0
        for i in range(2400):
            seed = seeds[i % len(seeds)]
            kind, data = _mutate(seed, rng)
            try:
                out = decode_bytes(data, max_pixels=20_000_000)
            except DecodeError as exc:
                assert str(exc)
                continue
            except Exception as exc:
                surprises.append(f"seed {i % len(seeds)} {kind}: {type(exc).__name__}: {exc}")
                continue
            assert isinstance(out, np.ndarray) and np.uint8 == out.dtype and 2 == out.ndim and out.size > 0
            decoded += 1
        assert [] == surprises
        assert 0 < decoded < 2400  # both outcomes were exercised
