"""results.csv rotation: monthly, daily and size boundaries, retention, crashes mid-rotation, upgrades."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from glob import glob
from pathlib import Path

import pandas as pd
import pytest
from structlog.testing import capture_logs

from watcher import failpoints
from watcher.config import ReportConfig
from watcher.errors import ReportError
from watcher.report import (
    COLUMNS,
    KNOWN_OLD_HEADERS,
    ResultRow,
    ResultsWriter,
    find_rows,
    format_utc,
    read_rows,
    results_files,
    rotated_files,
)

T0 = datetime(2026, 1, 30, 12, 0, tzinfo=timezone.utc)


class Clock:
    """An injectable UTC clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.t = now

    def __call__(self) -> datetime:
        return self.t


def row(name: str, at: datetime, claim: str = "c", **kw: str) -> ResultRow:
    base = dict.fromkeys(COLUMNS, "")
    base.update(processed_at=format_utc(at), file=name, status="ok", instance="me", claim=claim)
    base.update(destination=f"/processed/{name}")
    base.update(kw)
    return ResultRow(**base)


def names(path: Path) -> list[str]:
    return [r["file"] for r in read_rows(path)]


def all_names(path: Path) -> list[str]:
    """The rows of the whole set, read the way the README tells pandas users to."""
    pattern = str(path.with_name(f"{path.stem}*{path.suffix}"))
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in sorted(glob(pattern))]
    return list(pd.concat(frames)["file"]) if frames else []


def writer(path: Path, clock: Clock, **cfg: object) -> ResultsWriter:
    return ResultsWriter(path, ReportConfig(**cfg), now=clock).open()  # type: ignore[arg-type]


class Crash(BaseException):
    """Stands for SIGKILL at a failpoint: skips every ``except`` (the kernel drops the locks)."""


def crash_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def hit(name: str) -> None:
        if name == point:
            raise Crash(point)

    monkeypatch.setattr(failpoints, "hit", hit)


class TestTimeRotation:
    def test_monthly_at_the_first_batch_of_a_new_month(self, tmp_path: Path) -> None:
        """January's rows move to results-2026-01.csv when February's first batch comes."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock)
        w.append([row("a", T0), row("b", T0)])
        clock.t = datetime(2026, 1, 31, 23, 59, 59, tzinfo=timezone.utc)
        w.append([row("c", clock.t)])
        clock.t += timedelta(seconds=2)  # made before midnight, written after: stays in January
        w.append([row("d", clock.t - timedelta(seconds=1.5))])
        assert [] == rotated_files(path)
        january = path.read_bytes()
        w.append([row("e", clock.t)])
        rotated = tmp_path / "results-2026-01.csv"
        assert [rotated] == rotated_files(path)
        assert january == rotated.read_bytes()  # renamed, never rewritten
        assert ["e"] == names(path)
        assert ",".join(COLUMNS) == path.read_text().splitlines()[0]
        assert ["a", "b", "c", "d", "e"] == all_names(path)
        assert [rotated, path] == results_files(path)

    @pytest.mark.parametrize("first", ["spreadsheet date", "older instance's row"])
    def test_a_first_row_edited_or_of_an_older_version_still_rotates(
        self, tmp_path: Path, first: str
    ) -> None:
        """A first row whose processed_at a spreadsheet re-saved with a space, or a first row of
        fewer columns (an instance not yet upgraded shares the file): the month is still read,
        and the file rotates (it used to stay, silently, for good)."""
        path, clock = tmp_path / "results.csv", Clock()
        writer(path, clock).append([row("a", T0)])
        lines = path.read_text().splitlines(keepends=True)
        if first == "spreadsheet date":
            lines[1] = lines[1].replace(format_utc(T0), T0.strftime("%Y-%m-%d %H:%M:%S"), 1)
        else:
            lines[1] = ",".join(lines[1].rstrip("\n").split(",")[:15]) + "\n"
        path.write_text("".join(lines))
        clock.t = datetime(2026, 2, 1, 0, 0, 1, tzinfo=timezone.utc)
        w = writer(path, clock)
        with capture_logs() as logs:
            w.append([row("b", clock.t)])
        assert [tmp_path / "results-2026-01.csv"] == rotated_files(path)
        assert ["b"] == names(path)
        assert [] == [e for e in logs if e["event"] == "results_rotation_skipped"]

    def test_a_first_row_without_a_date_is_said_not_silent(self, tmp_path: Path) -> None:
        """No date and time in the first row at all: no rotation, and a warning says why."""
        path, clock = tmp_path / "results.csv", Clock()
        writer(path, clock).append([row("a", T0)])
        path.write_text(path.read_text().replace(format_utc(T0), "yesterday", 1))
        clock.t = datetime(2026, 2, 1, 0, 0, 1, tzinfo=timezone.utc)
        with capture_logs() as logs:
            writer(path, clock).append([row("b", clock.t)])
        assert [] == rotated_files(path)
        (event,) = [e for e in logs if e["event"] == "results_rotation_skipped"]
        assert "'yesterday'" in event["reason"]

    def test_daily(self, tmp_path: Path) -> None:
        """Daily: one file per UTC day, named after the day of its first row."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, rotate="daily")
        for day in range(3):
            clock.t = T0 + timedelta(days=day)
            w.append([row(f"d{day}a", clock.t), row(f"d{day}b", clock.t)])
        assert ["results-2026-01-30.csv", "results-2026-01-31.csv"] == [p.name for p in rotated_files(path)]
        assert ["d2a", "d2b"] == names(path)
        assert ["d0a", "d0b", "d1a", "d1b", "d2a", "d2b"] == all_names(path)

    def test_never(self, tmp_path: Path) -> None:
        """rotate: never keeps one file across months."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, rotate="never")
        for month in range(3):
            clock.t = T0 + timedelta(days=31 * month)
            w.append([row(f"m{month}", clock.t)])
        assert [] == rotated_files(path)
        assert ["m0", "m1", "m2"] == names(path)

    def test_name_taken_gets_a_counter(self, tmp_path: Path) -> None:
        """A rotated name already taken (clock set back) is never replaced."""
        path, clock = tmp_path / "results.csv", Clock()
        (tmp_path / "results-2026-01.csv").write_text("someone else's\n")
        w = writer(path, clock)
        w.append([row("a", T0)])
        clock.t = T0 + timedelta(days=5)
        w.append([row("b", clock.t)])
        assert "someone else's\n" == (tmp_path / "results-2026-01.csv").read_text()
        assert ["a"] == names(tmp_path / "results-2026-01_2.csv")

    def test_shared_file_rotated_by_another_instance(self, tmp_path: Path) -> None:
        """Two writers on one file: after A rotates, B appends to the new file, not the old one."""
        path, clock = tmp_path / "results.csv", Clock()
        a, b = writer(path, clock), writer(path, clock)
        a.append([row("a1", T0)])
        b.append([row("b1", T0)])
        clock.t = T0 + timedelta(days=3)
        a.append([row("a2", clock.t)])
        b.append([row("b2", clock.t)])
        assert ["a1", "b1"] == names(tmp_path / "results-2026-01.csv")
        assert ["a2", "b2"] == names(path)
        assert 1 == len(rotated_files(path))


class TestSizeRotation:
    def test_rotates_before_passing_max_mb(self, tmp_path: Path) -> None:
        """size: a batch that would take the file past max_mb starts results-0001.csv, -0002, ..."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, rotate="size", max_mb=1)
        big = "x" * 100_000
        for i in range(25):
            w.append([row(f"f{i:02d}", T0, error=big)])
        rotated = rotated_files(path)
        assert ["results-0001.csv", "results-0002.csv"] == [p.name for p in rotated]
        assert all(p.stat().st_size <= 1 << 20 for p in [*rotated, path])
        assert [f"f{i:02d}" for i in range(25)] == all_names(path)


class TestRetention:
    def test_keep_deletes_the_oldest(self, tmp_path: Path) -> None:
        """keep: 2 leaves the two newest rotated files (and the current one)."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, rotate="daily", keep=2)
        with capture_logs() as logs:
            for day in range(5):
                clock.t = T0 + timedelta(days=day)
                w.append([row(f"d{day}", clock.t)])
                os.utime(path, (clock.t.timestamp(), clock.t.timestamp()))  # mtime follows the clock
        assert ["results-2026-02-01.csv", "results-2026-02-02.csv"] == [p.name for p in rotated_files(path)]
        assert ["d2", "d3", "d4"] == all_names(path)
        deleted = [e["path"] for e in logs if e["event"] == "results_rotated_deleted"]
        assert [str(tmp_path / "results-2026-01-30.csv"), str(tmp_path / "results-2026-01-31.csv")] == deleted

    def test_keep_zero_keeps_all(self, tmp_path: Path) -> None:
        """keep: 0 (the default) never deletes."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, rotate="daily")
        for day in range(4):
            clock.t = T0 + timedelta(days=day)
            w.append([row(f"d{day}", clock.t)])
        assert 3 == len(rotated_files(path))


class TestOrderByContent:
    """Rotated files go by their first row's processed_at: touching or copying one changes nothing."""

    LATER = datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()  # after every real and test clock

    def test_keep_deletes_the_oldest_rows_not_the_oldest_mtime(self, tmp_path: Path) -> None:
        """keep: 2 deletes July's file even when it was touched last (not September's or August's)."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock, keep=2)
        july = tmp_path / "results-2026-07.csv"
        with capture_logs() as logs:
            for month in (7, 8, 9):
                clock.t = datetime(2026, month, 10, tzinfo=timezone.utc)
                w.append([row(f"m{month}", clock.t)])
            os.utime(july, (self.LATER, self.LATER))  # opened and re-saved, or cp without -p
            clock.t = datetime(2026, 10, 10, tzinfo=timezone.utc)
            w.append([row("m10", clock.t)])
        assert ["results-2026-08.csv", "results-2026-09.csv"] == [p.name for p in rotated_files(path)]
        deleted = [e["path"] for e in logs if e["event"] == "results_rotated_deleted"]
        assert [str(july)] == deleted
        assert ["m8", "m9", "m10"] == all_names(path)

    def test_recovery_reads_the_newest_rows_first(self, tmp_path: Path) -> None:
        """find_rows reads August's file before a touched July one, so it finds August's claim."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock)
        for month in (7, 8, 9):
            clock.t = datetime(2026, month, 10, tzinfo=timezone.utc)
            w.append([row(f"m{month}", clock.t, claim=f"c{month}", destination=f"/processed/m{month}")])
        july, august = tmp_path / "results-2026-07.csv", tmp_path / "results-2026-08.csv"
        os.utime(july, (self.LATER, self.LATER))
        assert [july, august] == rotated_files(path)
        assert [july, august, path] == results_files(path)
        # July's row (this instance, another claim, before not_before) ends the search: it must come last
        not_before = format_utc(datetime(2026, 8, 10, tzinfo=timezone.utc) - timedelta(hours=1))
        assert {("c8", "m8"): "/processed/m8"} == find_rows(path, {"c8"}, "me", not_before)

    def test_files_without_rows_fall_back_to_mtime(self, tmp_path: Path) -> None:
        """A rotated file with no parsable row sits where its mtime puts it; equal times go by name."""
        header = ",".join(COLUMNS) + "\n"
        march = tmp_path / "results-2026-03.csv"
        writer(march, Clock()).append([row("mar", datetime(2026, 3, 5, tzinfo=timezone.utc))])
        empty = tmp_path / "results-0007.csv"  # header only
        empty.write_text(header)
        junk = tmp_path / "results-2026-01_2.csv"  # not ours, no header
        junk.write_text("someone else's\n")
        twin = tmp_path / "results-2026-03_2.csv"  # the same first row as March's file
        twin.write_bytes(march.read_bytes())
        for p, month in ((empty, 2), (junk, 4), (march, 5)):
            stamp = datetime(2026, month, 1, tzinfo=timezone.utc).timestamp()
            os.utime(p, (stamp, stamp))
        assert [empty, march, twin, junk] == rotated_files(tmp_path / "results.csv")


class TestCrashDuringRotation:
    @pytest.mark.parametrize("point", ["rotated", "rotation_created"])
    def test_no_row_lost_or_doubled(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
    ) -> None:
        """A crash after the rename (or after the new file): the restart writes the batch once."""
        path, clock = tmp_path / "results.csv", Clock()
        w = writer(path, clock)
        w.append([row("jan", T0, claim="c1")])
        clock.t = T0 + timedelta(days=3)
        crash_at(monkeypatch, point)
        with pytest.raises(Crash):
            w.append([row("feb", clock.t, claim="c2")])
        assert ["jan"] == all_names(path)  # what a reader sees meanwhile: complete files only
        monkeypatch.undo()
        restarted = writer(path, clock)
        # recovery finds c1's row in the rotated file, none for c2: c2 is processed again
        found = find_rows(path, {"c1", "c2"}, "me", format_utc(T0 - timedelta(hours=1)))
        assert {("c1", "jan"): "/processed/jan"} == found
        restarted.append([row("feb", clock.t, claim="c2")])
        assert ["jan"] == names(tmp_path / "results-2026-01.csv")
        assert ["feb"] == names(path)
        assert ["jan", "feb"] == all_names(path)

    def test_sigkill_after_rename(self, tmp_path: Path) -> None:
        """A real SIGKILL at the 'rotated' failpoint: no current file, all rows in the rotated one."""
        path = tmp_path / "results.csv"
        writer(path, Clock()).append([row("jan", T0)])
        script = (
            "import sys; from datetime import datetime, timezone; from pathlib import Path;"
            "from watcher.report import ResultsWriter, ResultRow, COLUMNS;"
            "now = datetime(2026, 2, 2, tzinfo=timezone.utc);"
            "w = ResultsWriter(Path(sys.argv[1]), now=lambda: now).open();"
            "base = dict.fromkeys(COLUMNS, '');"
            "base.update(processed_at='2026-02-02T00:00:00.000Z', file='feb');"
            "w.append([ResultRow(**base)])"
        )
        env = {**os.environ, "XRAY_WATCHER_CRASH_AT": "rotated"}
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(
            [sys.executable, "-c", script, str(path)], env=env, cwd=root, capture_output=True, timeout=60
        )
        assert -signal.SIGKILL == proc.returncode, proc.stderr[-2000:]
        assert not path.exists()
        assert ["jan"] == names(tmp_path / "results-2026-01.csv")
        clock = Clock(datetime(2026, 2, 2, tzinfo=timezone.utc))
        writer(path, clock).append([row("feb", clock.t)])
        assert ["jan", "feb"] == all_names(path)

    def test_torn_tail_cut_before_rotating(self, tmp_path: Path) -> None:
        """A torn last line is cut before the file is rotated: rotated files end in whole rows."""
        path, clock = tmp_path / "results.csv", Clock()
        writer(path, clock).append([row("jan", T0)])
        with path.open("ab") as fh:
            fh.write(b'"2026-01-30T12:00:01.000Z","half')
        clock.t = T0 + timedelta(days=3)
        w = ResultsWriter(path, now=clock)  # not opened: the append itself cuts and rotates
        w.append([row("feb", clock.t)])
        assert (tmp_path / "results-2026-01.csv").read_bytes().endswith(b'"\n')
        assert ["jan", "feb"] == all_names(path)


OLD_COLUMNS = KNOWN_OLD_HEADERS[0].split(",")


def old_version_file(path: Path) -> bytes:
    """A results.csv as the previous version wrote it (15 columns), with a name full of odd bytes."""
    lines = [KNOWN_OLD_HEADERS[0]]
    for name, claim in (("a.jpg", "c1"), ('we"ird,\nname.jpg', "c2")):
        values = dict.fromkeys(OLD_COLUMNS, "")
        values.update(processed_at="2025-12-30T10:00:00.000Z", file=name, status="ok", claim=claim)
        values.update(instance="me", destination=f"/processed/{name}")
        lines.append(",".join('"' + values[c].replace('"', '""') + '"' for c in OLD_COLUMNS))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return data


class TestUpgrade:
    def test_old_header_rotated_aside_unchanged(self, tmp_path: Path) -> None:
        """An older version's file is renamed aside byte for byte; new rows start a new file."""
        path, clock = tmp_path / "results.csv", Clock(datetime(2026, 1, 2, tzinfo=timezone.utc))
        data = old_version_file(path)
        with capture_logs() as logs:
            w = writer(path, clock)
        aside = tmp_path / "results-2025-12-upgraded.csv"
        assert data == aside.read_bytes()
        (event,) = [e for e in logs if e["event"] == "results_rotated_for_upgrade"]
        assert (str(path), str(aside)) == (event["path"], event["rotated_to"])
        assert ",".join(COLUMNS) + "\n" == path.read_text()
        w.append([row("new.jpg", clock.t)])
        assert ["a.jpg", 'we"ird,\nname.jpg', "new.jpg"] == all_names(path)
        frame = pd.concat(pd.read_csv(p, dtype=str, keep_default_na=False) for p in results_files(path))
        assert ["", "", ""] == list(frame["heatmap"].fillna(""))

    def test_recovery_reads_the_upgraded_file(self, tmp_path: Path) -> None:
        """Claims left by the old version are found in the file rotated aside."""
        path, clock = tmp_path / "results.csv", Clock(datetime(2026, 1, 2, tzinfo=timezone.utc))
        old_version_file(path)
        writer(path, clock)
        found = find_rows(path, {"c2"}, "me", "2025-12-30T09:00:00.000Z")
        assert {("c2", 'we"ird,\nname.jpg'): '/processed/we"ird,\nname.jpg'} == found

    def test_upgrade_under_size_rotation_uses_the_counter(self, tmp_path: Path) -> None:
        """With rotate: size the old file becomes results-0001-upgraded.csv, the next rotation -0002."""
        path, clock = tmp_path / "results.csv", Clock()
        old_version_file(path)
        w = writer(path, clock, rotate="size", max_mb=1)
        for i in range(12):
            w.append([row(f"f{i}", T0, error="x" * 100_000)])
        assert ["results-0001-upgraded.csv", "results-0002.csv"] == sorted(
            p.name for p in rotated_files(path)
        )

    def test_foreign_header_still_refused(self, tmp_path: Path) -> None:
        """A header that is neither ours nor an older version's stops the service, file untouched."""
        path = tmp_path / "results.csv"
        path.write_text("processed_at,file,sha256\nx,y,z\n")
        with pytest.raises(ReportError, match="not written by this version"):
            writer(path, Clock())
        assert "processed_at,file,sha256\nx,y,z\n" == path.read_text()
        assert [] == rotated_files(path)


BOM = "\ufeff".encode()


class TestExcelSaved:
    def test_file_with_a_bom_rotates_and_is_recovered_from(self, tmp_path: Path) -> None:
        """A results.csv re-saved with a BOM rotates by its first row's month and is read in content order."""
        path, clock = tmp_path / "results.csv", Clock()
        writer(path, clock).append([row("jan", T0, claim="c1")])
        path.write_bytes(BOM + path.read_bytes())  # Excel "CSV UTF-8"
        december = tmp_path / "results-2025-12.csv"
        writer(december, clock).append([row("dec", datetime(2025, 12, 20, tzinfo=timezone.utc), claim="c0")])
        w = writer(path, clock)
        clock.t = T0 + timedelta(days=3)
        w.append([row("feb", clock.t, claim="c2")])
        january = tmp_path / "results-2026-01.csv"
        assert january.read_bytes().startswith(BOM)
        early = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()
        os.utime(january, (early, early))  # by mtime it would come first: its first row says otherwise
        assert [december, january] == rotated_files(path)
        assert ["feb"] == names(path)
        assert ["jan"] == names(january)
        found = find_rows(path, {"c1", "c2"}, "me", format_utc(T0 - timedelta(hours=1)))
        assert {("c1", "jan"): "/processed/jan", ("c2", "feb"): "/processed/feb"} == found

    def test_old_header_with_a_bom_is_upgraded(self, tmp_path: Path) -> None:
        """An older version's file re-saved with a BOM is still renamed aside, not refused."""
        path, clock = tmp_path / "results.csv", Clock(datetime(2026, 1, 2, tzinfo=timezone.utc))
        data = BOM + old_version_file(path)
        path.write_bytes(data)
        writer(path, clock).append([row("new.jpg", clock.t)])
        assert data == (tmp_path / "results-2025-12-upgraded.csv").read_bytes()
        assert ["new.jpg"] == names(path)
