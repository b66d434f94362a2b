"""The DICOM listener: real associations over loopback with pynetdicom as the SCU (storescu-style)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import cv2
import pydicom
import pytest
import yaml
from pydicom import config as dicom_config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
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
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, encode_file_meta, split_dataset
from structlog.testing import capture_logs

from tests.conftest import fixture_images
from tests.harness import (
    Daemon,
    log_output_held,
    notify_address,
    read_csv_both,
    returns_within,
    small_tmpfs,
    wait_for,
)
from watcher import fsutil, listener
from watcher.config import Config, load_config
from watcher.errors import WatcherError
from watcher.fsutil import rename_no_replace
from watcher.ingest import Ingest
from watcher.signals import SignalQueue
from watcher.signals import restore as restore_signals

DX = DigitalXRayImageStorageForPresentation
SC = SecondaryCaptureImageStorage
VERIFICATION = "1.2.840.10008.1.1"
AET = "XRAY_WATCHER"
ECHO = [(VERIFICATION, [ImplicitVRLittleEndian])]
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_dx(jpeg: Path, uid: str | None = None) -> Dataset:
    """A DX For Presentation data set (explicit VR LE, 8-bit MONOCHROME2) of a fixture radiograph."""
    img = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    uid = uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.StudyDate = "20240102"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """A Part 10 file (explicit VR LE) with ``ds.file_meta`` exactly as given, valid or not."""
    with dicom_config.disable_value_validation():
        body = encode(ds, False, True)
        assert body is not None
        path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(ds.file_meta) + body)
    return path


def write_config(root: Path, **listener_cfg: Any) -> Config:
    """A real config.yaml with real folders (no model is needed to listen)."""
    for name in ("inbox", "processed", "failed", "model_store"):
        (root / name).mkdir(parents=True, exist_ok=True)
    raw = {
        "inbox": "inbox",
        "processed": "processed",
        "failed": "failed",
        "results": "results.csv",
        "model_store": "model_store",
        "instance_id": "test",
        "listener": {"port": free_port(), "ae_title": AET, **listener_cfg},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return write_config(tmp_path / "svc")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test starts (listener, associations, their DUL threads) has ended after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    extra: list[threading.Thread] = []
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left running: {[t.name for t in extra]}")


@contextlib.contextmanager
def running(cfg: Config) -> Iterator[int]:
    """``listener.serve`` in a thread until the block ends; yields the port."""
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            listener.serve(cfg, ready, stop)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="listener-under-test")
    thread.start()
    try:
        assert ready.wait(20), "the listener did not start"
        assert [] == errors
        yield cfg.listener.port
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
    assert [] == errors


@contextlib.contextmanager
def associate(
    port: int,
    contexts: list[tuple[str, list[str]]],
    calling: str = "MODALITY",
    called: str = AET,
) -> Iterator[Association]:
    """An SCU association (released, or aborted, at the end)."""
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.ident is not None:  # a rejected association's thread never started
            assoc.join(10)
        ae.shutdown()


def store_status(assoc: Association, what: Dataset | Path) -> int:
    status = assoc.send_c_store(what)
    assert "Status" in status, "no response from the listener"
    return int(status.Status)


def inbox_names(cfg: Config) -> list[str]:
    return sorted(p.name for p in cfg.inbox.iterdir())


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


class TestUid:
    @pytest.mark.parametrize(
        # a generate_uid() result, fixed: test ids must not change between collections
        "uid",
        ["1.2.840.10008.5.1.4.1.1.1", "0", "1.0.2", "2.25." + "9" * 59, generate_uid(entropy_srcs=["fixed"])],
    )
    def test_valid(self, uid: str) -> None:
        """UIDs of the DICOM grammar are accepted."""
        assert listener.is_valid_uid(uid)

    @pytest.mark.parametrize(
        "uid",
        [
            "",
            "../../etc/x",
            "1.2.3/../4",
            "1.2.03",
            "1..2",
            ".1.2",
            "1.2.",
            "1.2.a",
            "1 .2",
            "2.25." + "9" * 61,
        ],
    )
    def test_invalid(self, uid: str) -> None:
        """Other characters, empty components, leading zeros and more than 64 characters are not."""
        assert not listener.is_valid_uid(uid)


class TestWriteInstance:
    def test_new_duplicate_and_different(self, tmp_path: Path) -> None:
        """A new UID lands as <uid>.dcm; the same bytes again are a duplicate; other bytes get a hash name."""
        uid = generate_uid()
        assert (tmp_path / f"{uid}.dcm", False) == listener.write_instance(tmp_path, uid, b"first")
        assert (tmp_path / f"{uid}.dcm", True) == listener.write_instance(tmp_path, uid, b"first")
        digest = hashlib.sha256(b"second").hexdigest()[:12]
        assert (tmp_path / f"{uid}.{digest}.dcm", False) == listener.write_instance(tmp_path, uid, b"second")
        assert (tmp_path / f"{uid}.{digest}.dcm", True) == listener.write_instance(tmp_path, uid, b"second")
        assert b"first" == (tmp_path / f"{uid}.dcm").read_bytes()
        assert {f"{uid}.dcm", f"{uid}.{digest}.dcm"} == {p.name for p in tmp_path.iterdir()}

    @pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
    def test_without_rename_noreplace(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
    ) -> None:
        """Where the filesystem cannot rename without replacing, the hard-link fallback, and
        without hard links too the check-then-rename one, still never replace a name."""

        def no_link(src: object, dst: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(fsutil, "rename_no_replace", lambda src, dst: False)
        if not links:
            monkeypatch.setattr(fsutil.os, "link", no_link)
        uid = generate_uid()
        assert (tmp_path / f"{uid}.dcm", False) == listener.write_instance(tmp_path, uid, b"a")
        assert (tmp_path / f"{uid}.dcm", True) == listener.write_instance(tmp_path, uid, b"a")
        assert not listener.write_instance(tmp_path, uid, b"b")[1]
        assert 2 == len(list(tmp_path.iterdir()))
        assert b"a" == (tmp_path / f"{uid}.dcm").read_bytes()

    def test_rename_no_replace(self, tmp_path: Path) -> None:
        """renameat2(RENAME_NOREPLACE) on this filesystem: renames, and refuses an existing name."""
        (tmp_path / "a").write_bytes(b"a")
        (tmp_path / "b").write_bytes(b"b")
        assert rename_no_replace(tmp_path / "a", tmp_path / "c")
        with pytest.raises(FileExistsError):
            rename_no_replace(tmp_path / "b", tmp_path / "c")
        with pytest.raises(FileNotFoundError):
            rename_no_replace(tmp_path / "a", tmp_path / "d")
        assert {"b": b"b", "c": b"a"} == {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def test_the_daemon_takes_a_received_instance_at_once(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A written instance reaches the inbox as a completed rename, so the observer hands
        it over without waiting for ingest.settle_ms (here a minute). A hard link, as written
        before, raised only IN_CREATE, and every received instance waited the settle time."""
        cfg = make_config(ingest={"settle_ms": 60_000})
        ingest = Ingest(cfg)
        ingest.start()
        try:
            uid = generate_uid()
            path, duplicate = listener.write_instance(cfg.inbox, uid, b"DICM data")
            assert cfg.inbox / f"{uid}.dcm" == path and not duplicate
            assert path == ingest.ready.get(timeout=10)
        finally:
            ingest.stop()

    def test_invalid_uid_never_becomes_a_name(self, tmp_path: Path) -> None:
        """write_instance itself refuses a UID that is not one."""
        with pytest.raises(ValueError):
            listener.write_instance(tmp_path / "inbox", "../x", b"data")
        assert [] == list(tmp_path.iterdir())

    def test_failed_write_leaves_nothing(self, tmp_path: Path) -> None:
        """An inbox that is a file raises OSError and leaves no temporary file."""
        inbox = tmp_path / "inbox"
        inbox.write_text("not a folder")
        with pytest.raises(OSError):
            listener.write_instance(inbox, generate_uid(), b"data")
        assert [inbox] == list(tmp_path.iterdir())


class TestEcho:
    def test_c_echo(self, cfg: Config) -> None:
        """C-ECHO (Verification) answers Success."""
        with running(cfg) as port, associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])]) as assoc:
            assert assoc.is_established
            assert 0x0000 == assoc.send_c_echo().Status

    def test_silent_connections_do_not_lock_modalities_out(self, cfg: Config) -> None:
        """Twelve TCP connections that never ask for an association (a scanner's broken retry
        loop) neither fill the slots nor hold them long: a modality's echo still gets through,
        and the silent ones are dropped within the ACSE timeout."""
        with running(cfg) as port:
            silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
            try:
                with associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])]) as assoc:
                    assert assoc.is_established
                    assert 0x0000 == assoc.send_c_echo().Status
                t0 = time.monotonic()
                for sock in silent:  # each is closed by the listener (after an A-ABORT, maybe)
                    sock.settimeout(listener.ACSE_TIMEOUT_S + 10)
                    with contextlib.suppress(ConnectionResetError):
                        while sock.recv(4096):
                            pass
                assert time.monotonic() - t0 < listener.ACSE_TIMEOUT_S + 10
            finally:
                for sock in silent:
                    sock.close()


class TestStore:
    def test_stores_generated_dx(self, cfg: Config) -> None:
        """Each instance lands as <uid>.dcm, a Part 10 file with the same data set; no .part files left."""
        sent = [make_dx(jpeg) for jpeg in fixture_images()[:3]]
        with (
            capture_logs() as logs,
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc,
        ):
            assert [0, 0, 0] == [store_status(assoc, ds) for ds in sent]
        assert sorted(f"{ds.SOPInstanceUID}.dcm" for ds in sent) == inbox_names(cfg)
        for ds in sent:
            path = cfg.inbox / f"{ds.SOPInstanceUID}.dcm"
            raw = path.read_bytes()
            assert b"DICM" == raw[128:132]
            got = pydicom.dcmread(path)
            assert ExplicitVRLittleEndian == got.file_meta.TransferSyntaxUID
            assert ds.SOPInstanceUID == got.file_meta.MediaStorageSOPInstanceUID
            assert DX == got.file_meta.MediaStorageSOPClassUID
            assert ds == got
            assert ds.PixelData == got.PixelData
        (closed,) = [e for e in logs if e["event"] == "association_closed"]
        assert {"calling_aet": "MODALITY", "called_aet": AET, "outcome": "released"}.items() <= closed.items()
        assert (3, 0, 0) == (closed["n_stored"], closed["n_duplicate"], closed["n_failed"])
        assert isinstance(closed["duration_ms"], int)
        assert closed["peer"].startswith("127.0.0.1:")
        text = json.dumps(logs, default=str)
        for value in [*PATIENT.values(), "20240102"]:
            assert value not in text, f"{value} was logged"

    def test_deflate_bomb_refused_before_it_is_inflated(self, tmp_path: Path) -> None:
        """A Deflated data set that inflates past what one image within decode.max_pixels can
        need is refused, Out of Resources, and nothing is written; a normal Deflated one is
        stored (pynetdicom inflated any size in memory: 1 GiB from 1 MB took 2.2 GB)."""
        cfg = write_config(tmp_path / "svc")
        raw = yaml.safe_load(cfg.source.read_text())  # type: ignore[union-attr]
        cfg.source.write_text(yaml.safe_dump({**raw, "decode": {"max_pixels": 100_000}}))  # type: ignore[union-attr]
        cfg = load_config(cfg.source)  # type: ignore[arg-type]
        bomb = make_dx(fixture_images()[0])
        bomb.add_new(0x00091010, "OB", b"\0" * (17 << 20))  # 17 MiB > 16 MiB + 4 x 100,000 bytes
        fine = make_dx(fixture_images()[1])
        for ds in (bomb, fine):
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        with (
            capture_logs() as logs,
            running(cfg) as port,
            associate(port, [(DX, [DeflatedExplicitVRLittleEndian])]) as assoc,
        ):
            assert (0xA700, 0) == (store_status(assoc, bomb), store_status(assoc, fine))
        assert [f"{fine.SOPInstanceUID}.dcm"] == inbox_names(cfg)
        (failed,) = [e for e in logs if e["event"] == "store_failed"]
        assert "decompression bomb" in str(failed["reason"])

    def test_sent_file_bytes_kept(self, cfg: Config, tmp_path: Path) -> None:
        """The data set is written as sent, byte for byte, behind the file meta header."""
        ds = make_dx(fixture_images()[0])
        path = save(ds, tmp_path / "sent.dcm")
        with running(cfg) as port, associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc:
            assert 0 == store_status(assoc, path)
        received = cfg.inbox / f"{ds.SOPInstanceUID}.dcm"
        sent_body = path.read_bytes()[split_dataset(path)[1] :]
        assert sent_body == received.read_bytes()[split_dataset(received)[1] :]

    TS_FILES: ClassVar[dict[str, str]] = {
        ExplicitVRLittleEndian: "SC_rgb_small_odd.dcm",
        ImplicitVRLittleEndian: "MR_small_implicit.dcm",
        DeflatedExplicitVRLittleEndian: "image_dfl.dcm",
        ExplicitVRBigEndian: "SC_rgb_small_odd_big_endian.dcm",
        RLELossless: "SC_rgb_rle.dcm",
        JPEGBaseline8Bit: "SC_rgb_small_odd_jpeg.dcm",
        JPEGExtended12Bit: "JPGExtended.dcm",
        JPEGLossless: "SC_rgb_jpeg_gdcm.dcm",  # an SV1 stream is a valid process 14 stream
        JPEGLosslessSV1: "SC_rgb_jpeg_gdcm.dcm",
        JPEGLSLossless: "MR_small_jpeg_ls_lossless.dcm",
        JPEGLSNearLossless: "JPEGLSNearLossless_16.dcm",
        JPEG2000Lossless: "MR_small_jp2klossless.dcm",
        JPEG2000: "JPEG2000.dcm",
    }

    def test_transfer_syntaxes(self, cfg: Config) -> None:
        """Every listed transfer syntax is accepted and stored as it arrived (pydicom's test files)."""
        assert set(self.TS_FILES) == set(listener.TRANSFER_SYNTAXES)
        sent: dict[str, Dataset] = {}
        for ts, name in self.TS_FILES.items():
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.file_meta.TransferSyntaxUID = ts
            ds.SOPClassUID = SC
            ds.SOPInstanceUID = generate_uid()
            sent[ts] = ds
        contexts = [(SC, [ts]) for ts in self.TS_FILES]
        with running(cfg) as port, associate(port, contexts) as assoc:
            assert len(contexts) == len(assoc.accepted_contexts)
            statuses = {ts: store_status(assoc, ds) for ts, ds in sent.items()}
        assert {ts: 0 for ts in sent} == statuses
        for ts, ds in sent.items():
            got = pydicom.dcmread(cfg.inbox / f"{ds.SOPInstanceUID}.dcm")
            assert ts == got.file_meta.TransferSyntaxUID
            assert ds.SOPInstanceUID == got.SOPInstanceUID
            assert ds.PixelData == got.PixelData, ts.name
        assert len(sent) == len(inbox_names(cfg))

    def test_other_sop_classes_refused(self, cfg: Config) -> None:
        """A CT presentation context is rejected at association time; DX is accepted."""
        contexts = [(CTImageStorage, [ExplicitVRLittleEndian]), (DX, [ExplicitVRLittleEndian])]
        with running(cfg) as port, associate(port, contexts) as assoc:
            assert [DX] == [cx.abstract_syntax for cx in assoc.accepted_contexts]
            assert [CTImageStorage] == [cx.abstract_syntax for cx in assoc.rejected_contexts]

    def test_duplicates(self, cfg: Config) -> None:
        """A resend is acknowledged once stored; other bytes under the same UID get a hashed name."""
        ds = make_dx(fixture_images()[0])
        with (
            capture_logs() as logs,
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc,
        ):
            assert 0 == store_status(assoc, ds)
            assert 0 == store_status(assoc, ds)
            ds.SeriesDescription = "re-windowed"
            assert 0 == store_status(assoc, ds)
        uid = ds.SOPInstanceUID
        (other,) = set(inbox_names(cfg)) - {f"{uid}.dcm"}
        assert 2 == len(inbox_names(cfg))
        assert other.startswith(f"{uid}.") and other.endswith(".dcm") and len(other) == len(uid) + 17
        assert "re-windowed" == pydicom.dcmread(cfg.inbox / other).SeriesDescription
        assert "SeriesDescription" not in pydicom.dcmread(cfg.inbox / f"{uid}.dcm")
        (closed,) = [e for e in logs if e["event"] == "association_closed"]
        assert (2, 1, 0) == (closed["n_stored"], closed["n_duplicate"], closed["n_failed"])


HOSTILE_UIDS = [
    "../../etc/x",
    "1.2.3/../4",
    "/tmp/x",
    "1.2.03.4",
    "1..2",
    "1.2.3.",
    "",
    "1.2.3\\4",
    "2.25." + "1" * 70,  # too long
]


class TestRefused:
    def test_hostile_dataset_uids(self, tmp_path: Path) -> None:
        """Data sets whose SOP Instance UID is not a UID get 0xA900; nothing is written anywhere."""
        cfg = write_config(tmp_path / "a" / "b" / "svc")
        files = {}
        for i, hostile in enumerate(HOSTILE_UIDS):
            ds = make_dx(fixture_images()[0])
            del ds.SOPInstanceUID
            with dicom_config.disable_value_validation():
                ds.SOPInstanceUID = hostile  # the request (from the file meta) keeps a valid UID
            files[hostile] = save(ds, tmp_path / f"hostile{i}.dcm")
        before = all_files(tmp_path)
        with (
            capture_logs() as logs,
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian]), *ECHO]) as assoc,
            pytest.MonkeyPatch.context() as mp,
        ):
            mp.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the files' bytes as they are
            statuses = {hostile: store_status(assoc, path) for hostile, path in files.items()}
            assert 0 == assoc.send_c_echo().Status  # the association carries on
        assert {h: listener.STATUS_DOES_NOT_MATCH_SOP_CLASS for h in HOSTILE_UIDS} == statuses
        assert before == all_files(tmp_path)
        assert [] == inbox_names(cfg)
        for hostile in HOSTILE_UIDS:
            assert not os.path.lexists(os.path.join(cfg.inbox, hostile + ".dcm"))
        failed = [e for e in logs if e["event"] == "store_failed"]
        assert len(HOSTILE_UIDS) == len(failed)
        assert {"0xA900"} == {e["status"] for e in failed}
        assert all("not a valid UID" in e["reason"] for e in failed)
        (closed,) = [e for e in logs if e["event"] == "association_closed"]
        assert (0, len(HOSTILE_UIDS)) == (closed["n_stored"], closed["n_failed"])

    def test_hostile_request_uid(self, cfg: Config, tmp_path: Path) -> None:
        """A hostile UID in both the C-STORE request and the data set is refused too."""
        ds = make_dx(fixture_images()[0])
        before = all_files(tmp_path)
        with (
            dicom_config.disable_value_validation(),
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc,
        ):
            del ds.SOPInstanceUID
            ds.SOPInstanceUID = "../../../../etc/x"
            assert 0xA900 == store_status(assoc, ds)
        assert before == all_files(tmp_path)
        assert not os.path.lexists(os.path.join(cfg.inbox, "../../../../etc/x.dcm"))

    def test_request_and_dataset_disagree(self, cfg: Config, tmp_path: Path) -> None:
        """The request's Affected SOP Instance UID must be the data set's SOP Instance UID."""
        ds = make_dx(fixture_images()[0])
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = save(ds, tmp_path / "mismatch.dcm")
        with (
            pytest.MonkeyPatch.context() as mp,
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc,
        ):
            mp.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
            assert 0xA900 == store_status(assoc, path)
        assert [] == inbox_names(cfg)

    def test_inbox_not_writable(self, cfg: Config) -> None:
        """When the inbox cannot take a file (here it became a plain file) the answer is 0xA700."""
        ds = make_dx(fixture_images()[0])
        with (
            capture_logs() as logs,
            running(cfg) as port,
            associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc,
        ):
            cfg.inbox.rmdir()
            cfg.inbox.write_text("the inbox is gone")
            assert 0xA700 == store_status(assoc, ds)
            cfg.inbox.unlink()
            cfg.inbox.mkdir()
            assert 0x0000 == store_status(assoc, ds)  # and recovers once it is back
        assert [f"{ds.SOPInstanceUID}.dcm"] == inbox_names(cfg)
        (failed,) = [e for e in logs if e["event"] == "store_failed"]
        assert "ENOTDIR" in failed["reason"]
        (closed,) = [e for e in logs if e["event"] == "association_closed"]
        assert (1, 1) == (closed["n_stored"], closed["n_failed"])

    def test_disk_full(self, tmp_path: Path) -> None:
        """A full filesystem answers 0xA700 and leaves no partial file."""
        root = tmp_path / "svc"
        with small_tmpfs(tmp_path / "small", "64k") as mnt:
            root.mkdir()
            (root / "inbox").symlink_to(mnt)
            cfg = write_config(root)
            ds = make_dx(fixture_images()[0])  # 224 x 224 + header > 50 kB
            ds.PixelData = ds.PixelData * 2
            ds.Rows = ds.Rows * 2
            with running(cfg) as port, associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc:
                assert 0xA700 == store_status(assoc, ds)
            assert [] == sorted(p.name for p in mnt.iterdir())


class TestAssociationPolicy:
    def test_calling_aet_not_allowed(self, tmp_path: Path) -> None:
        """A calling AE title outside allowed_calling_aets is rejected (calling AE title not recognised)."""
        cfg = write_config(tmp_path / "svc", allowed_calling_aets=["MODALITY", "CR_ROOM_2"])
        with capture_logs() as logs, running(cfg) as port:
            with associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])], calling="INTRUDER") as assoc:
                assert assoc.is_rejected
                assert (0x01, 0x01, 0x03) == (
                    assoc.acceptor.primitive.result,
                    assoc.acceptor.primitive.result_source,
                    assoc.acceptor.primitive.diagnostic,
                )
            with associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])], calling="CR_ROOM_2") as assoc:
                assert assoc.is_established
        rejected, accepted = [e for e in logs if e["event"] == "association_closed"]
        assert ("INTRUDER", "rejected", "calling AE title not recognised") == (
            rejected["calling_aet"],
            rejected["outcome"],
            rejected["reason"],
        )
        assert "warning" == rejected["log_level"]
        assert ("CR_ROOM_2", "released") == (accepted["calling_aet"], accepted["outcome"])

    def test_called_aet_must_match(self, cfg: Config) -> None:
        """A called AE title other than listener.ae_title is rejected (called AE title not recognised)."""
        with running(cfg) as port:
            with associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])], called="SOMEONE_ELSE") as assoc:
                assert assoc.is_rejected
                assert 0x07 == assoc.acceptor.primitive.diagnostic
            with associate(port, [(VERIFICATION, [ImplicitVRLittleEndian])], calling="ANY") as assoc:
                assert assoc.is_established  # no allow-list: any calling AE title

    def test_port_taken(self, cfg: Config) -> None:
        """A port in use is a WatcherError naming it, not a hang."""
        with socket.socket() as s:
            s.bind((cfg.listener.host, cfg.listener.port))
            s.listen()
            with pytest.raises(WatcherError, match=str(cfg.listener.port)):
                listener.serve(cfg, stop=threading.Event())


def listen_until_signalled(
    cfg: Config, signum: signal.Signals, timeout: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str, str, float]:
    """Start `xray-watcher listen`, send ``signum`` once it listens, wait at most ``timeout``
    for it to end (else kill it). Returns the process, its output up to ``listener_started``,
    its output after, and the seconds from the signal to its end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "listen", "--config", str(cfg.source)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if '"listener_started"' in line:
                break
        t0 = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=timeout)
        return proc, "".join(lines), out, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class TestCli:
    def test_the_signal_handler_only_queues_the_signal(self) -> None:
        """It logs nothing and takes no lock (it may interrupt the main thread while that
        holds the log's write lock); serve's loop logs it and sets ``stop``."""
        signals = SignalQueue()
        previous = signals.install((signal.SIGTERM, signal.SIGINT))
        try:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler)
            with log_output_held():
                assert returns_within(handler, (signal.SIGTERM, None), 2.0), "blocked on the log"
        finally:
            restore_signals(previous)
        stop = threading.Event()
        with capture_logs() as logs:
            listener._take_signals(signals, stop, notify_systemd=False)
        assert stop.is_set()
        assert ["SIGTERM"] == [e["signal"] for e in logs if e["event"] == "signal_received"]

    def test_the_listen_command_dumps_its_threads_on_sigabrt(self, cfg: Config) -> None:
        """`xray-watcher listen`, killed with SIGABRT (systemd's watchdog signal, or a native
        crash), first writes each thread's Python stack to stderr."""
        proc, started, out, _ = listen_until_signalled(cfg, signal.SIGABRT, timeout=30)
        assert -signal.SIGABRT == proc.returncode
        dump = started + out
        assert "Fatal Python error: Aborted" in dump and "most recent call first" in dump
        assert "listener.py" in dump  # where its main thread was

    def test_a_stop_that_never_ends_dumps_the_threads_and_exits_1(self, tmp_path: Path) -> None:
        """`xray-watcher listen` wedged after SIGTERM (here right after it logged its stop)
        writes every thread's stack to stderr and exits 1 once listener.stop_timeout_s has
        passed, instead of waiting for systemd's SIGKILL, which leaves no trace."""
        cfg = write_config(tmp_path / "svc", stop_timeout_s=2)
        proc, _, out, elapsed = listen_until_signalled(
            cfg, signal.SIGTERM, timeout=60, env={"XRAY_WATCHER_HANG_AT": "listener_stopped"}
        )
        assert 1 == proc.returncode
        assert 2.0 <= elapsed < 30
        events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert [2] == [e["stop_timeout_s"] for e in events if e["event"] == "stop_deadline_armed"]
        assert [e for e in events if e["event"] == "listener_stopped"]  # the stop was done; then it hung
        assert "Timeout (0:00:02)!" in out
        assert "most recent call first" in out and "failpoints.py" in out  # where it waited

    def test_sigterm_and_notify(self, cfg: Config, tmp_path: Path) -> None:
        """cli_main sends READY=1, serves, and on SIGTERM sends STOPPING=1 and exits 0."""
        sock_path, sock_env = notify_address()  # abstract: no path-length limit
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(sock_path)
            sock.settimeout(20)
            code = (
                "import sys; from watcher.config import load_config;"
                "from watcher.logs import configure_logging;"
                "from watcher.listener import cli_main; cfg = load_config(sys.argv[1]);"
                "configure_logging('info', 'json'); raise SystemExit(cli_main(cfg))"
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(cfg.source)],
                env={**os.environ, "NOTIFY_SOCKET": sock_env, "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                assert sock.recv(4096).decode().startswith("READY=1")
                with associate(cfg.listener.port, [(VERIFICATION, [ImplicitVRLittleEndian])]) as assoc:
                    assert 0 == assoc.send_c_echo().Status
                proc.terminate()
                assert "STOPPING=1" == sock.recv(4096).decode()
                out, _ = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert 0 == proc.returncode, out
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        assert "listener_started" in names and "association_closed" in names
        assert "listener_stopped" == names[-1]


class TestEndToEnd:
    @pytest.mark.slow
    def test_listen_and_run(self, make_config: Callable[..., Config]) -> None:
        """Files sent over the network are each scored by a live daemon: one results.csv row each."""
        cfg = make_config(listener={"port": free_port(), "ae_title": AET})
        sent = [make_dx(jpeg) for jpeg in fixture_images()[:3]]
        daemon = Daemon(cfg)
        try:
            wait_for(lambda: bool(daemon.events("watching")), 120, "the daemon to start watching")
            with running(cfg) as port, associate(port, [(DX, [ExplicitVRLittleEndian])]) as assoc:
                assert [0, 0, 0] == [store_status(assoc, ds) for ds in sent]
            wait_for(
                lambda: cfg.results.exists() and len(read_csv_both(cfg.results)) >= len(sent),
                60,
                "a row for each file sent",
            )
        finally:
            assert 0 == daemon.stop()
        rows = {r["file"]: r for r in read_csv_both(cfg.results)}
        assert {f"{ds.SOPInstanceUID}.dcm" for ds in sent} == set(rows)
        for ds in sent:
            row = rows[f"{ds.SOPInstanceUID}.dcm"]
            stored = Path(row["destination"])
            assert ds == pydicom.dcmread(stored)
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
            assert "ok" == row["status"], row["error"]  # needs DICOM decoding in the daemon
            assert row["label"] in ("NORMAL", "PNEUMONIA")
        for ds in sent:  # needs the sop_instance_uid column (DICOM columns of results.csv)
            assert ds.SOPInstanceUID == rows[f"{ds.SOPInstanceUID}.dcm"].get("sop_instance_uid")
