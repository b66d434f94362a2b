"""Atomic writes: replace by default, never replace with ``exclusive``, no temp file left."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher import fsutil
from watcher.fsutil import atomic_write_bytes


def test_a_write_replaces_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    atomic_write_bytes(path, b"old", durable=False)
    atomic_write_bytes(path, b"new", mode=0o644)
    assert b"new" == path.read_bytes()
    assert 0o644 == path.stat().st_mode & 0o777
    assert ["a.png"] == [p.name for p in tmp_path.iterdir()]


@pytest.mark.parametrize("fallback", ["renameat2", "hard-link", "no-hard-links"])
def test_an_exclusive_write_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    """FileExistsError for a taken name, whichever way the filesystem gives a name without
    replacing; the old file intact and no temp file left; a free name is written."""

    def no_link(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    if fallback != "renameat2":
        monkeypatch.setattr(fsutil, "rename_no_replace", lambda src, dst: False)
    if fallback == "no-hard-links":
        monkeypatch.setattr(fsutil.os, "link", no_link)
    taken = tmp_path / "a.png"
    taken.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        atomic_write_bytes(taken, b"second", durable=False, exclusive=True)
    atomic_write_bytes(tmp_path / "b.png", b"third", exclusive=True)
    assert {"a.png": b"first", "b.png": b"third"} == {p.name: p.read_bytes() for p in tmp_path.iterdir()}
