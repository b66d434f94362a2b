"""The versioned model store: list, read, publish, promote and roll back versions.

Layout::

    model_store/
      CURRENT            one line: the version the daemon serves (replaced atomically)
      history.jsonl      every change of CURRENT, for ``rollback``
      .lock              ``flock``ed while CURRENT and history.jsonl change (empty)
      v0001/             a published version, never edited afterwards
        model.keras      the Keras model (the record)
        model.onnx       the same network as an ONNX graph, exported at publish (optional;
        model.onnx.json  its record: see watcher.onnxrt), served without TensorFlow
        metadata.json    preprocessing, threshold, temperature, classes, training summary
        metrics.json     validation report (when training made one)
        *.png            plots

A version is built in a hidden temporary folder and published by one ``os.rename``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from watcher.errors import ModelStoreError
from watcher.fsutil import atomic_write_text, fsync_dir, write_all

log = structlog.get_logger()

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def list_versions(store: Path) -> list[str]:
    """Published versions, oldest first."""
    if not store.is_dir():
        raise ModelStoreError(f"model store {store} is not a folder")
    found = [p.name for p in store.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
    return sorted(found, key=lambda v: int(v[1:]))


def current_version(store: Path) -> str:
    """The version named by CURRENT, checked to exist."""
    pointer = store / CURRENT_FILE
    if not store.is_dir():
        raise ModelStoreError(f"model store {store} is not a folder")
    try:
        version = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ModelStoreError(
            f"model store {store} has no {CURRENT_FILE} pointer: train a model first "
            "(xray-watcher train --data DIR --promote)"
        ) from None
    except (OSError, ValueError) as exc:  # permissions, EIO, not UTF-8: the error, not a traceback
        raise ModelStoreError(f"cannot read {pointer}: {exc}") from exc
    if not _VERSION_RE.match(version) or not (store / version).is_dir():
        raise ModelStoreError(f"{pointer} names {version!r}, which is not a published version")
    return version


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON null); numpy scalars and arrays as Python's."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON for files and output others parse: an undefined figure (NaN: one class, an
    empty bin) is ``null``, never the ``NaN`` token that only some parsers accept."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def read_json(store: Path, version: str, name: str) -> dict[str, Any]:
    """One JSON file of a version."""
    path = store / version / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not (store / version).is_dir():
            known = ", ".join(list_versions(store)) if store.is_dir() else "none"
            raise ModelStoreError(f"no model version {version} in {store} (versions: {known})") from None
        raise ModelStoreError(f"version {version} has no {name} ({path})") from None
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path} must hold a JSON object")
    return data


def read_metadata(store: Path, version: str) -> dict[str, Any]:
    """metadata.json of a version."""
    return read_json(store, version, METADATA_FILE)


def new_build_dir(store: Path) -> Path:
    """A hidden scratch folder inside the store (same filesystem, so publish is a rename)."""
    build = store / f".build-{uuid.uuid4().hex[:12]}"
    build.mkdir()
    return build


def publish(store: Path, build: Path, stamp: Callable[[str], None] | None = None, at_least: int = 1) -> str:
    """Publish a finished build folder as the next version; returns its name.

    ``stamp(version)`` is called with the chosen name before the rename, so files in the
    build can record it (e.g. metadata.json's ``version``). The number is one past the
    highest of the version folders and of every version history.jsonl names (so the name of
    a deleted version never goes to other weights), and at least ``at_least`` (``init`` keeps
    the bundled model's name).
    """
    for name in (MODEL_FILE, METADATA_FILE):
        if not (build / name).is_file():
            raise ModelStoreError(f"build folder {build} lacks {name}; nothing published")
    for _ in range(100):
        highest = max([int(v[1:]) for v in list_versions(store)] + _recorded_numbers(store), default=0)
        number = max(highest + 1, at_least)
        version = f"v{number:04d}"
        if stamp is not None:
            stamp(version)
        for entry in build.iterdir():
            if entry.is_file():
                with entry.open("rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(build, store / version)  # fails if another publisher took the name
        except OSError:
            continue
        fsync_dir(store)
        log.info("model_published", version=version, store=str(store))
        return version
    raise ModelStoreError(f"could not find a free version name in {store}")


def publish_with_metadata(store: Path, build: Path, metadata: dict[str, Any]) -> str:
    """Write ``metadata`` (its ``version`` set to the chosen name) into the build, then publish it."""

    def stamp(version: str) -> None:
        metadata["version"] = version
        (build / METADATA_FILE).write_text(json_text(metadata) + "\n", encoding="utf-8")

    stamp("unpublished")
    return publish(store, build, stamp=stamp)


def _history(store: Path) -> list[dict[str, Any]]:
    path = store / HISTORY_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn line (a crash, a full disk); the pointer file is the truth
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _recorded_numbers(store: Path) -> list[int]:
    """The numbers of every version history.jsonl names ("from" or "to")."""
    numbers = []
    for entry in _history(store):
        for key in ("from", "to"):
            named = _VERSION_RE.match(str(entry.get(key) or ""))
            if named:
                numbers.append(int(named[1]))
    return numbers


def pointer(store: Path) -> str | None:
    """What CURRENT says, whether or not it names a published version; None where it is
    missing or cannot be read."""
    try:
        return (store / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``store/.lock`` (made 0644 if missing), held while CURRENT and
    history.jsonl change, so that two promotions or rollbacks at once happen one after the
    other. A lock needs no write access to its file: the descriptor is read-only."""
    path = store / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        os.fchmod(fd, 0o644)  # whatever the umask
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_history(store: Path, entry: dict[str, Any]) -> None:
    """Append one line to history.jsonl, durably; a torn last line (a full disk) is ended
    first, so that it cannot swallow this entry."""
    line = (json.dumps(entry) + "\n").encode("utf-8")
    fd = os.open(store / HISTORY_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(store: Path, version: str, reason: str, is_rollback: bool = False) -> bool:
    """Point CURRENT at ``version`` atomically and record the change; False (nothing written,
    ``model_already_current`` logged) where it is current already.

    Under the store's lock: the previous version is read, the change appended to
    history.jsonl, then CURRENT replaced (mode 0644, so that the daemon's user can read a
    pointer written by another, e.g. root).
    """
    if version not in list_versions(store):
        raise ModelStoreError(f"no published version {version!r} in {store}")
    with _locked(store):
        return _set_current_locked(store, version, reason, is_rollback)


def _set_current_locked(store: Path, version: str, reason: str, is_rollback: bool) -> bool:
    previous = pointer(store)
    if previous == version:
        log.info("model_already_current", version=version, reason=reason)
        return False
    entry = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from": previous,
        "to": version,
        "reason": reason,
        "rollback": is_rollback,
    }
    _append_history(store, entry)
    atomic_write_text(store / CURRENT_FILE, version + "\n", mode=0o644)
    log.info("model_current_changed", previous=previous, current=version, reason=reason)
    return True


def _cut_to(stack: list[str], version: str) -> None:
    """Drop what follows the last occurrence of ``version`` in ``stack``."""
    del stack[len(stack) - stack[::-1].index(version) :]


def promotion_stack(store: Path) -> list[str]:
    """Versions promoted and not rolled back, oldest first; the last is current.

    CURRENT is the truth, history.jsonl the record of how it got there. Replaying the
    history, an entry whose "from" is not the top of the stack but is in it says that what
    was recorded after that version's last occurrence never took effect (CURRENT could not
    be written after its history line): the stack is cut back to it first. An entry from a
    version to itself changed nothing and is skipped. The last entry, whose "from" is still
    CURRENT while the replay ends elsewhere, never took effect either (a promotion or a
    rollback interrupted between its history line and CURRENT): it is left out. After the
    replay, a top that is not CURRENT is cut back to CURRENT's last occurrence, where it has one.
    """
    entries = _history(store)
    current = pointer(store)
    stack = _replay(entries)
    if (
        current is not None
        and entries
        and stack
        and stack[-1] != current
        and entries[-1].get("from") == current
    ):
        stack = _replay(entries[:-1])
    if current is not None and stack and stack[-1] != current and current in stack:
        _cut_to(stack, current)
    return stack


def _replay(entries: list[dict[str, Any]]) -> list[str]:
    stack: list[str] = []
    for entry in entries:
        to, frm = entry.get("to"), entry.get("from")
        if not isinstance(to, str) or not to or to == frm:
            continue
        if isinstance(frm, str) and stack and stack[-1] != frm and frm in stack:
            _cut_to(stack, frm)
        if entry.get("rollback"):
            if stack:
                stack.pop()
            if stack and stack[-1] != to and to in stack:
                _cut_to(stack, to)
            elif not stack or stack[-1] != to:
                stack.append(to)
        elif not stack or stack[-1] != to:
            stack.append(to)
    return stack


def rollback(store: Path) -> str:
    """Point CURRENT back at the version promoted before it; returns that version."""
    with _locked(store):
        current = current_version(store)
        stack = promotion_stack(store)
        if len(stack) < 2 or stack[-1] != current:
            entries = _history(store)
            last = entries[-1] if entries else {}
            if not last:
                ends = "no entry"
            elif last.get("rollback"):
                ends = f"a rollback to {last.get('to')}"
            else:
                ends = f"a promotion to {last.get('to')}"
            raise ModelStoreError(
                f"no earlier promoted version to roll back to from {current}: {store / HISTORY_FILE} "
                f"ends with {ends}, CURRENT is {current}"
                + ("" if current in stack else f", and the history does not record {current} as promoted")
            )
        target = stack[-2]
        if target not in list_versions(store):
            raise ModelStoreError(
                f"cannot roll back from {current} to {target}: {target} is no longer in {store}"
            )
        _set_current_locked(store, target, f"rollback from {current}", is_rollback=True)
    return target


def import_version(store: Path, source: Path) -> str:
    """Publish a version folder trained elsewhere (another store) as this store's next version.

    The folder must hold ``model.keras`` and ``metadata.json``; copied into a build folder, it
    must pass what serving checks (``watcher.inference.Predictor``: usable metadata, a model
    that loads and takes the input its metadata describes) before anything is published.
    metadata.json gains ``imported_from``: the source folder, its version name and the model
    file's sha256. Not made current: promote it as any other version.
    """
    from watcher.inference import Predictor

    source = source.resolve()
    for name in (MODEL_FILE, METADATA_FILE):
        if not (source / name).is_file():
            raise ModelStoreError(f"{source} is not a model version: it has no {name}")
    build = new_build_dir(store)
    try:
        for entry in source.iterdir():
            if entry.is_file() and not entry.is_symlink():
                shutil.copy2(entry, build / entry.name)
        try:
            metadata = Predictor(store, build.name).metadata
        except ModelStoreError as exc:
            raise ModelStoreError(f"{source} cannot be imported: {exc}") from exc
        from watcher import onnxrt

        onnxrt.export_or_explain(build)  # checks a copied model.onnx against the model, or makes one
        digest = hashlib.sha256((build / MODEL_FILE).read_bytes()).hexdigest()
        metadata["imported_from"] = {
            "path": str(source),
            "version": str(metadata.get("version", source.name)),
            "model_sha256": digest,
        }
        return publish_with_metadata(store, build, metadata)
    except BaseException:
        remove_build(build)
        raise


def remove_build(build: Path) -> None:
    """Drop an unfinished build folder."""
    shutil.rmtree(build, ignore_errors=True)
