"""Filing never overwrites, keeps relative folders, tags clashes with a content hash."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from watcher.filing import place, plan_destination


class TestFiling:
    def test_relative_folders_kept(self, tmp_path: Path) -> None:
        """A nested file keeps its subfolders under the destination root."""
        src = tmp_path / "a.jpg"
        src.write_bytes(b"one")
        dest = plan_destination(tmp_path / "out", PurePosixPath("ward 3/day1/a.jpg"), "ff" * 32)
        place(src, dest)
        assert tmp_path / "out" / "ward 3" / "day1" / "a.jpg" == dest
        assert b"one" == dest.read_bytes()
        assert not src.exists()

    def test_clash_gets_hash_then_counter(self, tmp_path: Path) -> None:
        """A taken name is never overwritten: hash tag, then a counter."""
        root = tmp_path / "out"
        names = []
        for content in (b"first", b"second", b"third"):
            src = tmp_path / "x.png"
            src.write_bytes(content)
            dest = plan_destination(root, PurePosixPath("x.png"), "1234abcd" + "0" * 56)
            place(src, dest)
            names.append(dest.name)
        assert ["x.png", "x.1234abcd.png", "x.1234abcd-2.png"] == names
        assert b"first" == (root / "x.png").read_bytes()

    def test_place_refuses_existing(self, tmp_path: Path) -> None:
        """place() raises rather than replace a file that appeared meanwhile."""
        src, dest = tmp_path / "a", tmp_path / "b"
        src.write_bytes(b"new")
        dest.write_bytes(b"old")
        with pytest.raises(FileExistsError):
            place(src, dest)
        assert b"old" == dest.read_bytes()
        assert src.exists()

    def test_symlink_moved_as_link(self, tmp_path: Path) -> None:
        """A symbolic link is moved as the link itself; its target is untouched."""
        target = tmp_path / "secret.txt"
        target.write_text("do not touch")
        link = tmp_path / "l.jpg"
        link.symlink_to(target)
        dest = tmp_path / "out" / "l.jpg"
        place(link, dest)
        assert dest.is_symlink()
        assert target.read_text() == "do not touch"
        assert not link.exists() and not link.is_symlink()
