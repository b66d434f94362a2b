"""results.csv: header once, whole-line appends, torn-line repair, odd names round trip."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.errors import ReportError
from watcher.report import COLUMNS, ResultRow, ResultsWriter, read_rows, utc_now


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
