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
from collections.abc import Collection
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


NAME_MAX = 255  # bytes in one file name (ext4, XFS, btrfs, tmpfs; NFS and SMB mounts alike)


def _fit(stem: str, suffix: str) -> str:
    """``stem + suffix``, the stem cut so that the name fits ``NAME_MAX`` bytes (before a
    UTF-8 continuation byte: a character is never split)."""
    raw_stem, raw_suffix = os.fsencode(stem), os.fsencode(suffix)
    cut = NAME_MAX - len(raw_suffix)
    if len(raw_stem) <= cut:
        return stem + suffix
    while cut > 1 and raw_stem[cut] & 0xC0 == 0x80:
        cut -= 1
    return os.fsdecode(raw_stem[: max(1, cut)]) + suffix


def plan_destination(root: Path, rel: PurePosixPath, sha256: str, taken: Collection[Path] = ()) -> Path:
    """A path under ``root`` for ``rel`` that can be created: it does not exist yet, is not in
    ``taken`` (the paths already planned for others of the same batch, or recovered rows not yet
    filed) nor a folder of one, and each folder on the way is a folder or can be made one.

    A name that is taken gets the file's hash (``name.<sha8>.ext``, then ``-2``...); so does a
    folder on the way where a file (or a link) sits, or a planned file would; a name cut to
    fit ``NAME_MAX`` bytes. So a row never names a path that its file can never be given.
    """
    tag = sha256[:8] or "0" * 8

    def blocks(path: Path, as_folder: bool) -> bool:
        if any(t == path or (not as_folder and path in t.parents) for t in taken):
            return True
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):  # the latter: root itself is blocked
            return False  # (a file where our own label folder should be: the move says so)
        return not (as_folder and stat.S_ISDIR(st.st_mode))

    def free(parent: Path, name: str, as_folder: bool) -> Path:
        stem, suffix = (name, "") if as_folder else (PurePosixPath(name).stem, PurePosixPath(name).suffix)
        candidate = parent / _fit(stem, suffix)
        n = 1
        while blocks(candidate, as_folder):
            candidate = parent / _fit(stem, f".{tag}{'' if n == 1 else f'-{n}'}{suffix}")
            n += 1
        return candidate

    folder = root
    for part in rel.parts[:-1]:
        folder = free(folder, part, as_folder=True)
    return free(folder, rel.parts[-1], as_folder=False)


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
