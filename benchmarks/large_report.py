"""Start-up cost beside a results.csv with 1,000,000 rows of history, against a fresh one.

Usage (from the repo root; writes ~290 MB to a temporary folder, removed afterwards):

    .venv/bin/python benchmarks/large_report.py [--rows 1000000] [--dir /tmp] [--keep]

For each case a new Python process imports ``watcher.report`` and then times
``ResultsWriter.open()`` + one ``append`` + one ``find_rows`` (the recovery look-up, with
``not_before`` one hour back), and reports the wall time of those three and the peak
resident memory (VmHWM) of the whole process. Cases: a fresh (empty) results.csv; the large
file with ``rotate: never`` (appended to as is); the large file with ``rotate: monthly`` when
its first row is from an earlier month (renamed aside at the append, recovery then reads
the rotated file's tail too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from watcher.report import COLUMNS, ResultRow, _encode, _header  # noqa: E402

BLOCK_ROWS = 1000
NOW = "2026-01-20T12:00:00.000Z"

MEASURE = r"""
import json, sys, time
from datetime import datetime, timezone
from pathlib import Path
t_import = time.perf_counter()
from watcher.config import ReportConfig
from watcher.report import COLUMNS, ResultRow, ResultsWriter, find_rows
t_import = time.perf_counter() - t_import

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB

path, rotate = Path(sys.argv[1]), sys.argv[2]
now = datetime(2026, 1, 20, 12, 0, tzinfo=timezone.utc)
base = dict.fromkeys(COLUMNS, "")
base.update(processed_at="2026-01-20T12:00:00.000Z", file="new.jpeg", status="ok")
base.update(instance="me", claim="c-new")
rss_before = vm("VmRSS")
t0 = time.perf_counter()
w = ResultsWriter(path, ReportConfig(rotate=rotate), now=lambda: now).open()
t1 = time.perf_counter()
w.append([ResultRow(**base)])
t2 = time.perf_counter()
found = find_rows(path, {"c-crashed", "c-new"}, "me", "2026-01-20T11:00:00.000Z")
t3 = time.perf_counter()
print(json.dumps({
    "import_s": t_import, "open_s": t1 - t0, "append_s": t2 - t1, "find_rows_s": t3 - t2,
    "total_s": t3 - t0, "rss_before_mib": rss_before, "peak_rss_mib": vm("VmHWM"), "found": len(found),
}))
"""


def make_row(i: int, at: str, claim: str) -> ResultRow:
    base = dict.fromkeys(COLUMNS, "")
    base.update(
        processed_at=at,
        file=f"ward {i % 7}/IM-{i:06d}-0001.jpeg",
        sha256=f"{i:064x}",
        status="ok",
        label="NORMAL",
        probability="0.123456",
        threshold="0.578000",
        model_version="v0002",
        destination=f"/srv/xray/processed/NORMAL/ward {i % 7}/IM-{i:06d}-0001.jpeg",
        width="2048",
        height="2500",
        bytes="1834512",
        instance="me",
        claim=claim,
    )
    return ResultRow(**base)


def generate(path: Path, n_rows: int) -> None:
    """``n_rows`` rows over the past year (one day per block of 1,000), then 4 claimed-but-not-filed rows."""
    template = _encode([make_row(i, "2025-01-01T08:00:00.000Z", f"old{i // 16}") for i in range(BLOCK_ROWS)])
    with path.open("wb") as fh:
        fh.write(_header())
        n_blocks = n_rows // BLOCK_ROWS
        for b in range(n_blocks):
            day = time.strftime("%Y-%m-%d", time.gmtime(1735718400 + 86400 * (b * 365 // n_blocks)))
            fh.write(template.replace(b'"2025-01-01T', f'"{day}T'.encode()))
        fh.write(_encode([make_row(i, "2026-01-20T11:58:00.000Z", "c-crashed") for i in range(4)]))
        fh.flush()
        os.fsync(fh.fileno())  # else the first fsync of an append would flush the generator's pages


def measure(path: Path, rotate: str) -> dict[str, float]:
    cmd = [sys.executable, "-c", MEASURE, str(path), rotate]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="leave the files behind")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="large-report-", dir=args.dir))
    try:
        big = work / "big" / "results.csv"
        big.parent.mkdir()
        t0 = time.perf_counter()
        generate(big, args.rows)
        size = big.stat().st_size
        print(f"generated {args.rows:,} rows, {size / 1e6:,.0f} MB in {time.perf_counter() - t0:.1f} s")
        rotated = work / "rot" / "results.csv"
        rotated.parent.mkdir()
        shutil.copyfile(big, rotated)
        fresh = work / "fresh" / "results.csv"
        fresh.parent.mkdir()
        cases = [
            ("fresh results.csv", fresh, "never"),
            (f"{args.rows:,} rows, rotate: never", big, "never"),
            (f"{args.rows:,} rows, rotate: monthly (renamed aside)", rotated, "monthly"),
        ]
        results = []
        for label, path, rotate in cases:
            r = measure(path, rotate)
            results.append(r)
            print(
                f"{label:48s} open {r['open_s'] * 1000:7.1f} ms  append {r['append_s'] * 1000:6.1f} ms  "
                f"find_rows {r['find_rows_s'] * 1000:6.1f} ms  total {r['total_s'] * 1000:7.1f} ms  "
                f"peak RSS {r['peak_rss_mib']:6.1f} MiB  (rows found: {r['found']:.0f})"
            )
        base = results[0]
        for (label, _, _), r in zip(cases[1:], results[1:], strict=True):
            print(
                f"{label}: {(r['total_s'] - base['total_s']) * 1000:+.1f} ms, "
                f"{r['peak_rss_mib'] - base['peak_rss_mib']:+.1f} MiB peak RSS over a fresh file"
            )
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
