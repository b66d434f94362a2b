"""The versioned model store: list, read, publish, promote and roll back versions.

Layout::

    model_store/
      CURRENT            one line: the version the daemon serves (replaced atomically)
      history.jsonl      every change of CURRENT, for ``rollback``
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

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from watcher.errors import ModelStoreError
from watcher.fsutil import atomic_write_text, fsync_dir

log = structlog.get_logger()

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
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
    newest version's, and at least ``at_least`` (``init`` keeps the bundled model's name).
    """
    for name in (MODEL_FILE, METADATA_FILE):
        if not (build / name).is_file():
            raise ModelStoreError(f"build folder {build} lacks {name}; nothing published")
    for _ in range(100):
        versions = list_versions(store)
        number = max(int(versions[-1][1:]) + 1 if versions else 1, at_least)
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
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from a crash; the pointer file is the truth
    return out


def set_current(store: Path, version: str, reason: str, is_rollback: bool = False) -> None:
    """Point CURRENT at ``version`` atomically and record the change."""
    if version not in list_versions(store):
        raise ModelStoreError(f"no published version {version!r} in {store}")
    try:
        previous = current_version(store)
    except ModelStoreError:
        previous = None
    entry = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from": previous,
        "to": version,
        "reason": reason,
        "rollback": is_rollback,
    }
    with (store / HISTORY_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    atomic_write_text(store / CURRENT_FILE, version + "\n")
    log.info("model_current_changed", previous=previous, current=version, reason=reason)


def promotion_stack(store: Path) -> list[str]:
    """Versions promoted and not rolled back, oldest first; the last is current."""
    stack: list[str] = []
    for entry in _history(store):
        if entry.get("rollback"):
            if stack:
                stack.pop()
        elif entry.get("to"):
            stack.append(str(entry["to"]))
    return stack


def rollback(store: Path) -> str:
    """Point CURRENT back at the version promoted before it; returns that version."""
    current = current_version(store)
    stack = promotion_stack(store)
    if len(stack) < 2 or stack[-1] != current:
        raise ModelStoreError(
            f"no earlier promoted version to roll back to from {current} (see {store / HISTORY_FILE})"
        )
    target = stack[-2]
    set_current(store, target, reason=f"rollback from {current}", is_rollback=True)
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
