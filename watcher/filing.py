"""Moving finished files to ``processed/<LABEL>/`` or ``failed/`` without ever overwriting.

``plan_destination`` picks a free name (the relative path kept; on a clash a short content
hash, then a counter, goes before the extension). ``place`` moves the file there with
``os.link`` + ``unlink``, which fails rather than replaces if the name was taken meanwhile,
and falls back to copy + fsync + link across filesystems. ``link_into`` is the first half
of ``place``, for callers that make a whole batch of links durable with one folder fsync.
``destination_root`` is where a label's files go (``filing.layout``: ``label`` or
``date/label``, so no folder grows without bound); ``folder_size`` sizes a tree within a
time budget.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from watcher import failpoints
from watcher.fsutil import fsync_dir

LAYOUTS = ("label", "date/label")


def destination_root(base: Path, label: str | None, layout: str, when: datetime) -> Path:
    """The folder a file goes under: ``base/<LABEL>`` or ``base/YYYY-MM-DD/<LABEL>``.

    ``label`` None (a failed file): ``base`` or ``base/YYYY-MM-DD``. The day is ``when``'s
    in UTC (a naive ``when`` is taken as UTC), the same clock as ``processed_at``.
    """
    if label is not None and (label in ("", ".", "..") or "/" in label or "\0" in label):
        raise ValueError(f"label {label!r} cannot be a folder name")
    if layout == "label":
        return base / label if label is not None else base
    if layout == "date/label":
        if when.tzinfo is not None:
            when = when.astimezone(timezone.utc)
        day = base / when.strftime("%Y-%m-%d")
        return day / label if label is not None else day
    raise ValueError(f"filing.layout is {layout!r}, expected one of {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class FolderSize:
    """What ``folder_size`` counted; ``complete`` False: the time budget ran out first."""

    bytes: int
    files: int
    complete: bool
    seconds: float


def folder_size(root: Path, budget_s: float = 2.0) -> FolderSize:
    """Bytes and files under ``root`` (links not followed), walking for at most ``budget_s``.

    processed/ may hold millions of files: a status command shows a partial count (at least
    this much) rather than hang. Nothing is cached; call it rarely.
    """
    t0 = time.monotonic()
    total = files = 0
    stack = [root]
    seen = 0
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                seen += 1
                if seen % 512 == 0 and time.monotonic() - t0 > budget_s:
                    return FolderSize(total, files, False, time.monotonic() - t0)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):  # links and FIFOs hold no data
                        total += entry.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue  # removed meanwhile
    return FolderSize(total, files, True, time.monotonic() - t0)


def plan_destination(root: Path, rel: PurePosixPath, sha256: str, taken: Container[Path] = ()) -> Path:
    """A path under ``root`` for ``rel`` that does not exist yet, nor is in ``taken`` (the
    names already planned for others of the same batch)."""

    def used(path: Path) -> bool:
        return path in taken or os.path.lexists(path)

    target = root.joinpath(*rel.parts)
    if not used(target):
        return target
    stem, suffix = target.stem, target.suffix
    tagged = target.with_name(f"{stem}.{sha256[:8]}{suffix}")
    n = 2
    while used(tagged):
        tagged = target.with_name(f"{stem}.{sha256[:8]}-{n}{suffix}")
        n += 1
    return tagged


def link_into(src: Path, dest: Path) -> None:
    """Give ``src`` the second name ``dest`` (a copy across filesystems); never overwrites.

    Raises FileExistsError only if ``dest`` itself exists. Not yet durable: fsync
    ``dest.parent`` before removing ``src``.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a regular file sits where a folder should be
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot create folder {dest.parent}: a file of that name is in the way"
        ) from None
    try:
        os.link(src, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
            raise
        _copy_across(src, dest)


def place(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; raises FileExistsError if ``dest`` exists, never overwrites."""
    link_into(src, dest)
    fsync_dir(dest.parent)
    failpoints.hit("linked")
    os.unlink(src)
    fsync_dir(src.parent)


def _copy_across(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    st = os.lstat(src)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), tmp)
        elif not stat.S_ISREG(st.st_mode):  # a FIFO or socket: make the same node, never open it
            os.mknod(tmp, st.st_mode, st.st_rdev)
        else:
            shutil.copy2(src, tmp, follow_symlinks=False)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.link(tmp, dest, follow_symlinks=False)
    finally:
        tmp.unlink(missing_ok=True)
