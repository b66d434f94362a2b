"""DICOM Storage SCP (``xray-watcher listen``): a producer into the inbox, like a person dropping files.

Modelled on pynetdicom's own ``storescp`` app: one ``EVT_C_STORE`` handler that writes the
instance and returns a DIMSE status, ``AE.start_server``, and log lines from the connection
events. The daemon (``xray-watcher run``) takes the files from the inbox like any other;
nothing here decodes pixels or knows about the model.

What is accepted:

* Verification (C-ECHO), and C-STORE of the projection radiograph classes a chest X-ray
  comes in: CR, Digital X-Ray for presentation and for processing, and single-frame
  Secondary Capture (digitised films, exports). Mammography, intra-oral, angiography and
  fluoroscopy classes are left out on purpose: not chest radiographs. Other classes are
  refused at association time (presentation context rejected), so nothing else is stored.
* The transfer syntaxes in ``TRANSFER_SYNTAXES``; the instance is stored in the syntax it
  arrived in (never transcoded): the bytes sent by the peer behind a File Meta header.

How an instance is written: as ``<SOPInstanceUID>.dcm``, a DICOM Part 10 file (preamble, File
Meta Information, the data set as received), first under a hidden ``.<uid>.<random>.dcm.part``
name (the daemon ignores hidden and ``*.part`` files), fsynced, then renamed to the final name
with ``renameat2(RENAME_NOREPLACE)``, which never replaces an existing name (a plain ``rename``
would) and which the daemon's observer sees as a file arriving complete, so it is taken at once
(a hard link, the fallback where the filesystem cannot, waits ``ingest.settle_ms``: 1 s). The
folder is then fsynced.

Duplicates (a second instance with the same SOP Instance UID while the first is still in the
inbox): the same bytes again (an SCU retrying after a lost response) are acknowledged with
Success and not written twice (logged as ``duplicate``); different bytes are kept too, as
``<uid>.<first 12 hex digits of their sha256>.dcm``, so nothing is lost and nothing is
overwritten. Once the daemon has taken the first copy out of the inbox, a resend lands again
as ``<uid>.dcm`` and is scored again (results.csv's ``sha256`` column tells such rows apart).

DIMSE statuses of C-STORE (PS3.4 Annex B.2.3):

* ``0x0000`` Success: written (or a byte-identical duplicate already there).
* ``0xA900`` Error, Data Set does not match SOP Class: the data set has no SOP Instance UID,
  its SOP Instance UID is not a valid UID (digits and dots, at most 64 characters, no empty
  component, no leading zero), or its SOP Class/Instance UID differs from the C-STORE
  request's Affected SOP Class/Instance UID. The data set could be parsed, but it violates
  its IOD (a UI value of the wrong form), so this is the A9xx family, not Cxxx; the bad UID
  never becomes a file name.
* ``0xC210`` Error, Cannot understand: the data set cannot be parsed (as ``storescp``).
* ``0xA700`` Refused, Out of Resources: the file cannot be written (disk full, inbox missing,
  not a folder or not writable); the SCU should retry later.

Association policy: the *called* AE title must be ``listener.ae_title`` (rejected otherwise
with "called AE title not recognised": a modality configured with the wrong destination is a
configuration error better seen at once than silently accepted); when
``listener.allowed_calling_aets`` is not empty, any other *calling* AE title is rejected with
"calling AE title not recognised". AE titles are an address, not authentication: keep the
port behind a firewall (or bind ``host`` to the modality network only).

Logging: one ``association_closed`` event per connection (calling/called AE, peer, outcome:
released, aborted, dropped, rejected with a reason, or no_association; counts; duration),
one ``store_failed`` warning per failed C-STORE with its reason, and ``instance_stored`` at
debug level. Only UIDs, AE titles, addresses and file names are
logged, never patient names, IDs or dates.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

from watcher import failpoints, systemd
from watcher.config import Config
from watcher.dicom import check_deflated_size
from watcher.errors import ConfigError, DecodeError, WatcherError
from watcher.fsutil import fsync_dir, move_no_replace, write_all
from watcher.signals import SignalQueue, arm_exit_deadline
from watcher.signals import restore as restore_signals

log = structlog.get_logger()

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,  # process 14
    JPEGLosslessSV1,  # process 14, selection value 1
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

MAX_ASSOCIATIONS = 64  # simultaneous associations from peers (pynetdicom's default: 10)
ACSE_TIMEOUT_S = 5.0  # a peer gets this long to ask for (or release) an association (default: 30)
SHUTDOWN_GRACE_S = 10.0  # on stop, how long open associations may take to finish

_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_SOP_CLASS_UID_TAG = 0x00080016
_SOP_INSTANCE_UID_TAG = 0x00080018


def is_valid_uid(value: str) -> bool:
    """DICOM UID grammar (PS3.5 9.1): numeric components joined by dots, no leading zeros, <= 64."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


class StoreRefused(Exception):
    """A C-STORE that is answered with a failure ``status``; ``reason`` goes to the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _raw_uid(ds: Any, tag: int) -> str | None:
    """The UID at ``tag`` as sent (no pydicom value validation), or None when absent."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).rstrip("\x00 ")


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data`` (False when it cannot be read)."""
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def write_instance(inbox: Path, uid: str, data: bytes) -> tuple[Path, bool]:
    """Write ``data`` as ``inbox/<uid>.dcm`` (or the hashed name); returns (path, duplicate).

    ``uid`` must already have passed ``is_valid_uid``. Raises ``OSError`` when it cannot write.
    """
    if not is_valid_uid(uid):
        raise ValueError(f"not a valid UID: {uid!r}")
    digest = hashlib.sha256(data).hexdigest()
    names = (f"{uid}.dcm", f"{uid}.{digest[:12]}.dcm")
    fd, tmp = _create_part(inbox, uid)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in names:
            final = inbox / name
            if final.parent != inbox:  # cannot happen with a valid UID; never write elsewhere
                raise OSError(errno.EINVAL, f"refusing to write outside the inbox: {name!r}")
            try:
                move_no_replace(tmp, final)
            except FileExistsError:
                if _same_bytes(final, data):
                    return final, True
                continue
            return final, False
        raise FileExistsError(errno.EEXIST, f"{names[-1]} exists with other bytes", str(inbox / names[-1]))
    finally:
        tmp.unlink(missing_ok=True)
        fsync_dir(inbox)


def _create_part(inbox: Path, uid: str) -> tuple[int, Path]:
    """A new hidden ``.<uid>.<random>.dcm.part`` file (mode 0666 less the umask), open for writing."""
    while True:
        tmp = inbox / f".{uid}.{secrets.token_hex(4)}.dcm.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, tmp


@dataclass
class _Assoc:
    """What is known about one connection, for its closing log line."""

    peer: str
    started: float = field(default_factory=time.monotonic)
    calling_aet: str = ""
    called_aet: str = ""
    outcome: str = "no_association"  # then accepted -> released / aborted, or rejected
    reason: str = ""
    n_stored: int = 0
    n_duplicate: int = 0
    n_failed: int = 0


class StoreSCP:
    """The event handlers of the listener, with per-association and total counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.inbox = cfg.inbox
        self._lock = threading.Lock()
        self._assocs: dict[int, _Assoc] = {}
        self.totals = {"n_associations": 0, "n_stored": 0, "n_duplicate": 0, "n_failed": 0}

    def handlers(self) -> list[EventHandlerType]:
        """``evt_handlers`` for ``AE.start_server``."""
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def _state(self, event: Any) -> _Assoc:
        key = id(event.assoc)
        with self._lock:
            state = self._assocs.get(key)
            if state is None:
                state = self._assocs[key] = _Assoc(peer=_peer(event.assoc))
            return state

    def _names(self, event: Any, state: _Assoc) -> None:
        primitive = event.assoc.requestor.primitive
        if primitive is not None:
            state.calling_aet = str(primitive.calling_ae_title or "").strip()
            state.called_aet = str(primitive.called_ae_title or "").strip()

    def on_conn_open(self, event: Any) -> None:
        state = self._state(event)
        log.debug("connection_opened", peer=state.peer)

    def on_accepted(self, event: Any) -> None:
        state = self._state(event)
        self._names(event, state)
        state.outcome = "accepted"

    def on_rejected(self, event: Any) -> None:
        state = self._state(event)
        self._names(event, state)
        state.outcome = "rejected"
        allowed = self.cfg.listener.allowed_calling_aets
        if state.called_aet != self.cfg.listener.ae_title.strip():
            state.reason = "called AE title not recognised"
        elif allowed and state.calling_aet not in [a.strip() for a in allowed]:
            state.reason = "calling AE title not recognised"
        else:
            state.reason = "too many associations"

    def on_released(self, event: Any) -> None:
        self._state(event).outcome = "released"

    def on_aborted(self, event: Any) -> None:
        self._state(event).outcome = "aborted"

    def on_conn_close(self, event: Any) -> None:
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
            if state is None:
                return
            self.totals["n_associations"] += 1
        outcome = "dropped" if state.outcome == "accepted" else state.outcome  # closed without release
        fields: dict[str, Any] = {
            "calling_aet": state.calling_aet,
            "called_aet": state.called_aet,
            "peer": state.peer,
            "outcome": outcome,
            "n_stored": state.n_stored,
            "n_duplicate": state.n_duplicate,
            "n_failed": state.n_failed,
            "duration_ms": round((time.monotonic() - state.started) * 1000),
        }
        if state.reason:
            fields["reason"] = state.reason
        if state.outcome == "rejected":
            log.warning("association_closed", **fields)
        else:
            log.info("association_closed", **fields)

    def on_store(self, event: Any) -> int:
        """Write one instance into the inbox; the DIMSE status for the SCU."""
        state = self._state(event)
        uid: str | None = None
        try:
            uid = self._checked_uid(event)
            path, duplicate = write_instance(self.inbox, uid, event.encoded_dataset())
        except StoreRefused as exc:
            return self._failed(state, exc.status, exc.reason, uid, event)
        except OSError as exc:
            reason = f"cannot write into the inbox: {exc.strerror or exc}"
            if exc.errno is not None:
                reason += f" ({errno.errorcode.get(exc.errno, exc.errno)})"
            return self._failed(state, STATUS_OUT_OF_RESOURCES, reason, uid, event)
        with self._lock:
            if duplicate:
                state.n_duplicate += 1
                self.totals["n_duplicate"] += 1
            else:
                state.n_stored += 1
                self.totals["n_stored"] += 1
        log.debug(
            "instance_stored",
            file=path.name,
            sop_instance_uid=uid,
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            transfer_syntax=str(event.context.transfer_syntax),
            duplicate=duplicate,
            peer=state.peer,
        )
        return STATUS_SUCCESS

    def _checked_uid(self, event: Any) -> str:
        """The data set's SOP Instance UID, once it is known to be safe as a file name."""
        if event.context.transfer_syntax == DeflatedExplicitVRLittleEndian:
            try:  # pynetdicom inflates the whole data set in memory to read it: bound it first
                check_deflated_size(event.request.DataSet.getvalue(), self.cfg.decode.max_pixels)
            except DecodeError as exc:
                raise StoreRefused(STATUS_OUT_OF_RESOURCES, str(exc)) from exc
        try:
            ds = event.dataset
            uid = _raw_uid(ds, _SOP_INSTANCE_UID_TAG)
            sop_class = _raw_uid(ds, _SOP_CLASS_UID_TAG)
        except Exception as exc:  # pydicom raises many types on a corrupt stream (cf. storescp)
            raise StoreRefused(
                STATUS_CANNOT_UNDERSTAND, f"cannot parse the data set: {type(exc).__name__}"
            ) from exc
        if uid is None:
            raise StoreRefused(STATUS_DOES_NOT_MATCH_SOP_CLASS, "the data set has no SOP Instance UID")
        if not is_valid_uid(uid):
            raise StoreRefused(
                STATUS_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Instance UID is not a valid UID ({len(uid)} characters; expected digits and "
                "dots, at most 64, no leading zeros)",
            )
        requested = str(event.request.AffectedSOPInstanceUID or "")
        if requested != uid:
            raise StoreRefused(
                STATUS_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID differs from the request's Affected SOP Instance UID",
            )
        if sop_class != str(event.request.AffectedSOPClassUID or ""):
            raise StoreRefused(
                STATUS_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request's Affected SOP Class"
            )
        return uid

    def _failed(self, state: _Assoc, status: int, reason: str, uid: str | None, event: Any) -> int:
        with self._lock:
            state.n_failed += 1
            self.totals["n_failed"] += 1
        shown = uid if uid is not None else str(event.request.AffectedSOPInstanceUID or "")
        log.warning(
            "store_failed",
            status=f"0x{status:04X}",
            reason=reason,
            sop_instance_uid=shown[:80],
            calling_aet=state.calling_aet,
            peer=state.peer,
        )
        return status


def _peer(assoc: Any) -> str:
    requestor = assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def build_ae(cfg: Config) -> AE:
    """The application entity: supported contexts and the association policy."""
    listener = cfg.listener
    try:
        ae = AE(ae_title=listener.ae_title)
        ae.require_calling_aet = list(listener.allowed_calling_aets)
    except ValueError as exc:
        source = cfg.source or "config"
        raise ConfigError(f"{source}: key 'listener' has an invalid AE title: {exc}") from exc
    ae.require_called_aet = True
    # a peer that connects and says nothing holds a slot until the ACSE timer ends: with
    # pynetdicom's 10 slots and 30 s, ten silent connections turned every modality away
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.acse_timeout = ACSE_TIMEOUT_S
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION)
    return ae


def serve(
    cfg: Config,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    *,
    on_ready: Callable[[], None] | None = None,
    notify_systemd: bool = False,
    stop_deadline: bool = False,
) -> int:
    """Run the Storage SCP until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    ``ready`` is set (and ``on_ready()`` called) once the port is listening. On stop the
    port is closed first, open associations get ``SHUTDOWN_GRACE_S`` to finish, then are
    aborted. Returns the exit code, 0. Raises ``WatcherError`` when the port cannot be bound.
    ``notify_systemd``: a signal also sends STOPPING=1. ``stop_deadline`` (the ``listen``
    command's own process, not a test's): a process still alive ``listener.stop_timeout_s``
    after the first signal writes every thread's stack to stderr and exits 1
    (``signals.arm_exit_deadline``), below the unit's ``TimeoutStopSec=30``, whose SIGKILL
    leaves no trace.
    """
    own_signals = stop is None and threading.current_thread() is threading.main_thread()
    stop = stop if stop is not None else threading.Event()
    signals = SignalQueue()
    previous = signals.install((signal.SIGTERM, signal.SIGINT)) if own_signals else {}
    scp = StoreSCP(cfg)
    ae = build_ae(cfg)
    host, port = cfg.listener.host, cfg.listener.port
    address: tuple[str, int] | tuple[str, int, int, int] = (host, port, 0, 0) if ":" in host else (host, port)
    try:
        server = ae.start_server(address, block=False, evt_handlers=scp.handlers())
    except OSError as exc:
        restore_signals(previous)
        raise WatcherError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    assert server is not None  # block=False returns the running server
    bound_port = server.server_address[1]
    log.info(
        "listener_started",
        host=host,
        port=bound_port,
        ae_title=cfg.listener.ae_title,
        allowed_calling_aets=list(cfg.listener.allowed_calling_aets),
        inbox=str(cfg.inbox),
    )
    try:
        if ready is not None:
            ready.set()
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.2):
            _take_signals(signals, stop, notify_systemd)
        if stop_deadline and own_signals:
            arm_exit_deadline(cfg.listener.stop_timeout_s)
            log.info("stop_deadline_armed", stop_timeout_s=cfg.listener.stop_timeout_s)
    finally:
        server.shutdown()  # no new connections
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        n_aborted = 0
        for assoc in server.active_associations:
            n_aborted += 1
            assoc.abort()
        for assoc in server.active_associations:
            assoc.join(timeout=5)
        ae.shutdown()
        restore_signals(previous)
        log.info("listener_stopped", port=bound_port, n_aborted=n_aborted, **scp.totals)
        failpoints.hang("listener_stopped")
    return 0


def _take_signals(signals: SignalQueue, stop: threading.Event, notify_systemd: bool) -> None:
    """A queued SIGTERM/SIGINT stops the listener (and says STOPPING=1 to systemd if asked)."""
    if signals.take():
        if notify_systemd:
            systemd.notify("STOPPING=1")
        stop.set()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xray-watcher listen`` beyond ``--config``: none, everything is in the config."""


def cli_main(cfg: Config) -> int:
    """``xray-watcher listen``: SIGTERM/SIGINT stop, systemd READY=1/STOPPING=1, then ``serve``."""
    listener = cfg.listener

    def on_ready() -> None:
        systemd.notify(f"READY=1\nSTATUS=listening on {listener.host}:{listener.port} as {listener.ae_title}")

    return serve(cfg, on_ready=on_ready, notify_systemd=True, stop_deadline=True)
