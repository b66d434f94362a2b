"""results.csv: header once, whole-line appends, torn-line repair, odd names round trip, find_rows."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from watcher import report
from watcher.config import ReportConfig
from watcher.errors import ReportError
from watcher.report import (
    COLUMNS,
    KNOWN_OLD_HEADERS,
    ResultRow,
    ResultsWriter,
    disk_report,
    find_rows,
    format_utc,
    low_disk_warning,
    read_rows,
    utc_now,
)


def row(name: str, **kw: str) -> ResultRow:
    base = dict.fromkeys(COLUMNS, "")
    base.update(processed_at=utc_now(), file=name, sha256="ab" * 32, status="ok", label="NORMAL")
    base.update(kw)
    return ResultRow(**base)


REQUIRED = [
    "processed_at",
    "file",
    "sha256",
    "status",
    "label",
    "probability",
    "threshold",
    "model_version",
    "destination",
    "error",
]


class TestResultsWriter:
    def test_header_written_once(self, tmp_path: Path) -> None:
        """Opening twice and appending keeps one header line."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open().append([row("a.jpg")])
        ResultsWriter(path).open().append([row("b.jpg"), row("c.jpg")])
        lines = path.read_text().splitlines()
        assert 1 == sum(1 for line in lines if line.startswith("processed_at,"))
        assert ["a.jpg", "b.jpg", "c.jpg"] == [r["file"] for r in read_rows(path)]

    def test_required_columns_present(self, tmp_path: Path) -> None:
        """Every column the issue names is in the header."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open()
        header = path.read_text().splitlines()[0].split(",")
        assert all(c in header for c in REQUIRED)

    def test_torn_last_line_is_repaired(self, tmp_path: Path) -> None:
        """A half-written last row (crash) is cut off on open; earlier rows stay."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open().append([row("a.jpg"), row("b.jpg")])
        with path.open("a") as fh:
            fh.write('2026-01-01T00:00:00Z,"half, writ')
        ResultsWriter(path).open().append([row("c.jpg")])
        assert ["a.jpg", "b.jpg", "c.jpg"] == [r["file"] for r in read_rows(path)]
        assert 3 == len(pd.read_csv(path))

    def test_empty_file_gets_the_header(self, tmp_path: Path) -> None:
        """An existing empty file (touched by an operator) gets the header, then rows."""
        path = tmp_path / "r.csv"
        path.touch()
        ResultsWriter(path).open().append([row("a.jpg")])
        assert ",".join(COLUMNS) == path.read_text().splitlines()[0]
        assert ["a.jpg"] == [r["file"] for r in read_rows(path)]

    def test_foreign_header_refused(self, tmp_path: Path) -> None:
        """A file with another header is not appended to."""
        path = tmp_path / "r.csv"
        path.write_text("name,value\nx,1\n")
        with pytest.raises(ReportError, match="not written by this version"):
            ResultsWriter(path).open()

    def test_unwritable_folder(self, tmp_path: Path) -> None:
        """A results file that cannot be created is a ReportError."""
        with pytest.raises(ReportError):
            ResultsWriter(tmp_path / "missing" / "r.csv").open()

    @settings(max_examples=60, deadline=None)
    @given(
        names=st.lists(
            st.text(
                alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1,
                max_size=40,
            ),
            min_size=1,
            max_size=5,
        )
    )
    def test_any_file_name_round_trips(
        self, tmp_path_factory: pytest.TempPathFactory, names: list[str]
    ) -> None:
        """Names with commas, quotes, newlines, unicode survive the csv module and pandas."""
        path = tmp_path_factory.mktemp("csv") / "r.csv"
        writer = ResultsWriter(path).open()
        writer.append([row(n, error=f"bad: {n}") for n in names])
        assert names == [r["file"] for r in read_rows(path)]
        with path.open(encoding="utf-8", newline="") as fh:
            text = fh.read()
        assert names == [r["file"] for r in csv.DictReader(io.StringIO(text, newline=""))]
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert names == list(frame["file"])


OLD_HEADER = KNOWN_OLD_HEADERS[0]
NASTY = st.text(alphabet='"\n,\r2026-T:0Zab\u00e9', min_size=1, max_size=30)


def true_record_starts(data: bytes) -> set[int]:
    """Every record start, by counting quotes from the top (the slow, obviously right way)."""
    starts, quotes = set(), 0
    for i, b in enumerate(data):
        if b == 0x22:
            quotes += 1
        elif b == 0x0A and quotes % 2 == 0:
            starts.add(i + 1)
    return starts


class TestColumns:
    def test_new_columns_follow_claim(self) -> None:
        """The DICOM, warning and heat-map columns come after claim, in this order."""
        tail = (
            "claim",
            "study_instance_uid",
            "series_instance_uid",
            "sop_instance_uid",
            "warning",
            "heatmap",
        )
        assert tail == COLUMNS[-6:]
        assert OLD_HEADER == ",".join(COLUMNS[:15])

    def test_old_callers_still_build_rows(self) -> None:
        """The new fields default to empty, so a row built with the 15 old fields still works."""
        r = ResultRow(*(["x"] * 15))
        assert ("", "", "", "", "") == (
            r.study_instance_uid,
            r.series_instance_uid,
            r.sop_instance_uid,
            r.warning,
            r.heatmap,
        )


class TestRecordStarts:
    @settings(max_examples=80, deadline=None)
    @given(names=st.lists(NASTY, min_size=1, max_size=8), block=st.integers(3, 40), data=st.data())
    def test_found_backwards_without_counting_from_the_top(
        self, tmp_path_factory: pytest.TempPathFactory, names: list[str], block: int, data: st.DataObject
    ) -> None:
        """Names full of quotes, commas, newlines and fake timestamps never fool the backward scan."""
        path = tmp_path_factory.mktemp("rs") / "r.csv"
        ResultsWriter(path).open().append([row(n, error=n[::-1], heatmap=n) for n in names])
        raw = path.read_bytes()
        starts = true_record_starts(raw)
        header_end = raw.index(b"\n") + 1
        end = data.draw(st.integers(header_end, len(raw)))
        fd = os.open(path, os.O_RDONLY)
        try:
            with patch.object(report, "_BLOCK", block):
                found = report._record_start_before(fd, end, header_end)
        finally:
            os.close(fd)
        assert found in starts and found <= end

    @settings(max_examples=60, deadline=None)
    @given(names=st.lists(NASTY, min_size=2, max_size=8), data=st.data())
    def test_torn_tail_cut_exactly(
        self, tmp_path_factory: pytest.TempPathFactory, names: list[str], data: st.DataObject
    ) -> None:
        """A cut anywhere in the last batch leaves exactly the rows written whole before it."""
        path = tmp_path_factory.mktemp("torn") / "r.csv"
        ResultsWriter(path).open().append([row(names[0])])
        whole = path.read_bytes()
        ResultsWriter(path).open().append([row(n) for n in names[1:]])
        raw = path.read_bytes()
        cut = data.draw(st.integers(len(whole), len(raw)))
        path.write_bytes(raw[:cut])
        starts = true_record_starts(raw) | {len(whole)}
        expected = max(s for s in starts if s <= cut)
        if cut + 1 in starts:  # only the newline is missing: the row is whole and stays
            expected = cut + 1
        folder = path.parent
        with patch.object(report, "_BLOCK", 8):
            ResultsWriter(path).open()
        assert raw[:expected] == path.read_bytes()
        kept = [p.read_bytes() for p in folder.glob("r.csv.torn-*")]
        assert ([raw[expected:cut]] if expected < cut else []) == kept


def without_last_newline(path: Path) -> bytes:
    """Drop the file's final newline, as some editors do on save; returns the bytes before."""
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    return raw


class TestTornTail:
    def test_whole_last_row_without_newline_is_kept(self, tmp_path: Path) -> None:
        """A complete last row that lacks only its newline gets the newline back, not cut."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open().append([row("a.jpg"), row('b, "odd"\n.jpg', heatmap="/h/b.png")])
        raw = without_last_newline(path)
        with capture_logs() as logs:
            ResultsWriter(path).open().append([row("c.jpg")])
        assert path.read_bytes().startswith(raw)
        assert ["a.jpg", 'b, "odd"\n.jpg', "c.jpg"] == [r["file"] for r in read_rows(path)]
        assert [] == [e for e in logs if e["event"] == "results_torn_line_removed"]
        (event,) = [e for e in logs if e["event"] == "results_newline_added"]
        assert str(path) == event["path"]
        assert [] == list(tmp_path.glob("r.csv.torn-*"))

    def test_editor_saved_row_without_newline_is_kept(self, tmp_path: Path) -> None:
        """A last row quoted only where needed (an editor's save, CRLF) and without newline stays."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open().append([row("a.jpg")])
        last = io.StringIO()
        b = row("b.jpg")
        csv.writer(last, lineterminator="\r\n").writerow([getattr(b, c) for c in COLUMNS])
        with path.open("ab") as fh:
            fh.write(last.getvalue().rstrip("\r\n").encode())
        ResultsWriter(path).open().append([row("c.jpg")])
        assert ["a.jpg", "b.jpg", "c.jpg"] == [r["file"] for r in read_rows(path)]

    @pytest.mark.parametrize("cut", [2, 3, 6], ids=["inside-last-quotes", "after-last-comma", "mid-field"])
    def test_cut_row_is_removed_and_kept_aside(self, tmp_path: Path, cut: int) -> None:
        """A row cut short (even one with all its commas) is removed; its bytes go to a side file."""
        path = tmp_path / "r.csv"
        ResultsWriter(path).open().append([row("a.jpg")])
        whole = path.read_bytes()
        ResultsWriter(path).open().append([row("b.jpg", warning="warn")])
        raw = path.read_bytes()
        path.write_bytes(raw[:-cut])  # ...,"warn",""\n less its last `cut` bytes
        with capture_logs() as logs:
            ResultsWriter(path).open()
        assert whole == path.read_bytes()
        (event,) = [e for e in logs if e["event"] == "results_torn_line_removed"]
        (side,) = tmp_path.glob("r.csv.torn-*")
        assert str(side) == event["kept_in"]
        assert raw[len(whole) : -cut] == side.read_bytes()
        assert len(raw) - cut - len(whole) == event["removed_bytes"]

    def test_side_files_never_overwritten(self, tmp_path: Path) -> None:
        """Two torn lines cut within one second go to two side files; the first is not replaced."""
        path = tmp_path / "r.csv"
        now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
        w = ResultsWriter(path, now=lambda: now).open()
        w.append([row("a.jpg")])
        for torn in (b'"2026-03-01T12:00:00.000Z","first', b'"2026-03-01T12:00:00.000Z","second'):
            with path.open("ab") as fh:
                fh.write(torn)
            ResultsWriter(path, now=lambda: now).open()
        kept = sorted(p.read_bytes() for p in tmp_path.glob("r.csv.torn-*"))
        assert [b'"2026-03-01T12:00:00.000Z","first', b'"2026-03-01T12:00:00.000Z","second'] == kept
        assert ["a.jpg"] == [r["file"] for r in read_rows(path)]
        assert [] == [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class TestTornTailOnAFullDisk:
    def test_nothing_cut_when_the_bytes_cannot_be_kept(self, tmp_path: Path) -> None:
        """No room for the side file (a real full tmpfs): the torn bytes stay in results.csv,
        and opening fails with a ReportError saying so."""
        from tests.harness import small_tmpfs

        with small_tmpfs(tmp_path / "disk", "64k") as disk:
            path = disk / "r.csv"
            ResultsWriter(path).open().append([row("a.jpg")])
            with path.open("ab") as fh:
                fh.write(b'"2026-03-01T12:00:00.000Z","torn')
            before = path.read_bytes()
            with (disk / "filler").open("wb", buffering=0) as fh, contextlib.suppress(OSError):
                while True:  # fill the disk to the last block
                    fh.write(b"x" * 4096)
            with pytest.raises(ReportError, match="cannot keep the torn last line"):
                ResultsWriter(path).open()
            assert before == path.read_bytes()
            assert [] == list(disk.glob("r.csv.torn-*"))


def excel_csv(path: Path, rows: list[ResultRow]) -> bytes:
    """results.csv as Excel saves it as "CSV UTF-8": a BOM, CRLF, quotes only where needed."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    out.writerow(COLUMNS)
    for r in rows:
        out.writerow([getattr(r, c) for c in COLUMNS])
    data = ("\ufeff" + buf.getvalue()).encode()
    path.write_bytes(data)
    return data


class TestExcelSaved:
    def test_bom_and_crlf_keep_working(self, tmp_path: Path) -> None:
        """A file Excel saved (BOM, CRLF, minimal quotes) opens; appends continue; every reader reads it."""
        path = tmp_path / "r.csv"
        odd = 'b, "odd"\n.jpg'
        saved = excel_csv(
            path,
            [
                row("a.jpg", claim="c1", instance="me", destination="/p/a.jpg"),
                row(odd, claim="c2", instance="me", destination=f"/p/{odd}"),
            ],
        )
        w = ResultsWriter(path, ReportConfig(rotate="never")).open()
        w.append([row("c.jpg", claim="c3", instance="me", destination="/p/c.jpg")])
        assert path.read_bytes().startswith(saved)  # nothing rewritten
        rows = read_rows(path)
        assert list(COLUMNS) == list(rows[0])  # the BOM is not part of the first column's name
        assert ["a.jpg", odd, "c.jpg"] == [r["file"] for r in rows]
        expected = {("c1", "a.jpg"): "/p/a.jpg", ("c2", odd): f"/p/{odd}", ("c3", "c.jpg"): "/p/c.jpg"}
        assert expected == find_rows(path, {"c1", "c2", "c3"}, "me", None)
        assert [odd, "c.jpg"] == [r["file"] for r in report.tail_rows(path, 2)]
        assert list(COLUMNS) == list(report.tail_rows(path, 1)[0])
        assert ["a.jpg", odd, "c.jpg"] == list(pd.read_csv(path, dtype=str, keep_default_na=False)["file"])

    def test_foreign_header_with_a_bom_still_refused(self, tmp_path: Path) -> None:
        """Only a BOM is forgiven: another header behind one still stops the service."""
        path = tmp_path / "r.csv"
        path.write_bytes("\ufeffname,value\r\nx,1\r\n".encode())
        with pytest.raises(ReportError, match="not written by this version"):
            ResultsWriter(path).open()


class TestFindRows:
    def test_finds_rows_by_claim_and_file(self, tmp_path: Path) -> None:
        """Only this instance's rows of the claims asked for, keyed by (claim, file)."""
        path = tmp_path / "r.csv"
        w = ResultsWriter(path).open()
        w.append([row("a.jpg", claim="c1", instance="me", destination="/p/a.jpg")])
        w.append([row("b.jpg", claim="c2", instance="me", destination="/p/b.jpg")])
        w.append([row("a.jpg", claim="c1", instance="other", destination="/q/a.jpg")])
        assert {("c1", "a.jpg"): "/p/a.jpg"} == find_rows(path, {"c1"}, "me", None)
        assert {} == find_rows(path, set(), "me", None)
        assert {} == find_rows(tmp_path / "missing.csv", {"c1"}, "me", None)

    @settings(max_examples=60, deadline=None)
    @given(names=st.lists(NASTY, min_size=1, max_size=10, unique=True), block=st.integers(5, 200))
    def test_odd_names_match_read_rows(
        self, tmp_path_factory: pytest.TempPathFactory, names: list[str], block: int
    ) -> None:
        """Names with quotes, commas, newlines and '\\n"20': the backward scan finds what read_rows does."""
        path = tmp_path_factory.mktemp("fr") / "r.csv"
        w = ResultsWriter(path).open()
        for i, n in enumerate(names):
            w.append([row(n, claim=f"c{i % 3}", instance="me", destination=f"/d/{n}", error=n)])
        with path.open("ab") as fh:
            fh.write(b'"2026-01-01T00:00:00.000Z","torn, with\n"quote')  # a torn tail is no row
        expected = {(r["claim"], r["file"]): r["destination"] for r in read_rows(path)}
        with patch.object(report, "_BLOCK", block):
            assert expected == find_rows(path, {"c0", "c1", "c2"}, "me", None)

    def test_record_longer_than_a_block(self, tmp_path: Path) -> None:
        """A row bigger than the read block (a long error with newlines) is read whole."""
        path = tmp_path / "r.csv"
        long_error = ('x\n"20' * 15_000) + "end"  # 105 kB quoted: above the block, below csv's limit
        w = ResultsWriter(path).open()
        w.append([row("a.jpg", claim="c1", instance="me", destination="/d/a", error=long_error)])
        w.append([row("b.jpg", claim="c2", instance="me", destination="/d/b")])
        assert {("c1", "a.jpg"): "/d/a", ("c2", "b.jpg"): "/d/b"} == find_rows(path, {"c1", "c2"}, "me", None)

    def test_stops_at_older_rows_of_this_instance(self, tmp_path: Path) -> None:
        """Reading back stops at this instance's first row of another claim older than not_before."""
        path = tmp_path / "r.csv"
        w = ResultsWriter(path, ReportConfig(rotate="never")).open()
        old = format_utc(datetime(2025, 1, 1, tzinfo=timezone.utc))
        recent = datetime(2026, 3, 1, tzinfo=timezone.utc)
        # an old row of the claim asked for, behind an old row of another claim: not reached
        w.append([row("ancient.jpg", claim="c1", instance="me", processed_at=old)])
        w.append([row("old.jpg", claim="c0", instance="me", processed_at=old)])
        w.append([row("new.jpg", claim="c1", instance="me", processed_at=format_utc(recent))])
        late = format_utc(recent - timedelta(hours=2))  # another instance's, within the slack
        w.append([row("x.jpg", claim="c9", instance="other", processed_at=late)])
        not_before = format_utc(recent - timedelta(hours=1))
        with patch.object(report, "_BLOCK", 64):  # about one row per block read
            assert {("c1", "new.jpg")} == set(find_rows(path, {"c1"}, "me", not_before))
            assert {("c1", "new.jpg"), ("c1", "ancient.jpg")} == set(find_rows(path, {"c1"}, "me", None))

    def test_other_instances_rows_stop_after_the_slack(self, tmp_path: Path) -> None:
        """Other instances' rows stop the scan only when older than not_before minus the slack."""
        path = tmp_path / "r.csv"
        w = ResultsWriter(path, ReportConfig(rotate="never")).open()
        t = datetime(2026, 3, 1, tzinfo=timezone.utc)
        h3, h2 = format_utc(t - timedelta(hours=3)), format_utc(t - timedelta(hours=2))
        w.append([row("mine.jpg", claim="c1", instance="me", processed_at=h3)])
        w.append([row("x.jpg", claim="z", instance="other", processed_at=h2)])
        not_before = format_utc(t - timedelta(minutes=10))
        with patch.object(report, "_BLOCK", 64):
            assert {("c1", "mine.jpg")} == set(find_rows(path, {"c1"}, "me", not_before))
            assert {} == find_rows(path, {"c1"}, "me", not_before, others_slack_s=60)


class TestFaults:
    def test_results_replaced_by_a_folder(self, tmp_path: Path) -> None:
        """An append to a path that became a folder fails clearly; once the file is back, rows resume."""
        path = tmp_path / "r.csv"
        w = ResultsWriter(path).open()
        w.append([row("a.jpg")])
        kept = tmp_path / "r.kept"
        path.rename(kept)
        path.mkdir()
        with pytest.raises(ReportError, match=r"cannot open .*Is a directory"):
            w.append([row("b.jpg")])
        path.rmdir()
        kept.rename(path)
        w.append([row("b.jpg")])
        assert ["a.jpg", "b.jpg"] == [r["file"] for r in read_rows(path)]

    def test_file_deleted_while_running(self, tmp_path: Path) -> None:
        """A results file removed under a running writer is created again, header first."""
        path = tmp_path / "r.csv"
        w = ResultsWriter(path).open()
        w.append([row("a.jpg")])
        path.unlink()
        w.append([row("b.jpg")])
        assert ["b.jpg"] == [r["file"] for r in read_rows(path)]
        assert [] == [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class TestDiskReport:
    def test_sizes_and_free_space(self, tmp_path: Path) -> None:
        """The results set's sizes and each filesystem's free space, without walking processed/."""
        path = tmp_path / "results.csv"
        ResultsWriter(path).open().append([row("a.jpg")])
        (tmp_path / "results-2026-01.csv").write_bytes(b"x" * 10)
        (tmp_path / "processed").mkdir()
        (tmp_path / "failed").mkdir()
        rep = disk_report(path, tmp_path / "processed", tmp_path / "failed", min_free_mb=0)
        assert [str(tmp_path / "results-2026-01.csv"), str(path)] == [f["path"] for f in rep["results_files"]]
        assert 10 + path.stat().st_size == rep["results_bytes"]
        assert ["results"] == list(rep["free"])  # one filesystem: named once
        assert rep["free"]["results"]["free_mb"] > 0
        assert rep["warning"] is None

    def test_low_disk_warning(self, tmp_path: Path) -> None:
        """Below min_free_mb the warning names the folder, the free space and the setting."""
        huge = 1 << 40
        message = low_disk_warning(tmp_path / "r.csv", tmp_path, tmp_path, huge)
        assert message is not None
        assert str(tmp_path) in message and "MB free" in message and f"({huge:,} MB)" in message
        assert low_disk_warning(tmp_path / "r.csv", tmp_path, tmp_path, 0) is None


class TestTailRows:
    @pytest.mark.parametrize("block", [3, 64, 1 << 16])
    def test_last_rows_only_with_odd_names_and_a_torn_tail(self, tmp_path: Path, block: int) -> None:
        """tail_rows gives the last n whole rows, oldest first, whatever the names hold."""
        path = tmp_path / "results.csv"
        writer = ResultsWriter(path, ReportConfig(rotate="never")).open()
        names = [f'x{i}, "q"\n\r\n"2026 {i}.png' for i in range(30)]
        writer.append([row(n) for n in names])
        writer.close()
        with open(path, "ab") as fh:
            fh.write(b'"2026-11-25T00:00:00.000Z","torn')
        with patch.object(report, "_BLOCK", block):
            got = report.tail_rows(path, 7)
        assert names[-7:] == [r["file"] for r in got]
        assert [] == report.tail_rows(tmp_path / "missing.csv", 5)
