"""Throughput of ``xray-watcher backfill`` (local and Ray engines) and what an archive would take.

Usage (from the repo root; reads ../shared, never used by the tests):

    .venv/bin/python benchmarks/backfill.py [--source ../shared/data/fullres] [--files 2000]
        [--small 200] [--batch 32] [--store model_store] [--engines local,ray]

The source images are replicated (hard links, else copies) to ``--files`` files in a temp
folder. Each engine scores ``--small`` files, then all ``--files`` files, into fresh outputs;
the difference of the two runs gives the steady rate (files/s once running) and the fixed
cost per job (model load, Ray actors starting up), which the printed projection uses:

    hours(1,000,000 files on N machines of C cores) = fixed + 1e6 / (N * C * per_core_rate)

(assumes decoding, the bulk of the work, scales with cores, as it does across Ray nodes;
Ray's own start-up is measured and printed apart.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.backfill import backfill
from watcher.logs import configure_logging


def replicate(files: list[Path], n: int, dest: Path) -> str:
    """``n`` files under ``dest`` (r000/, r001/, ...), hard-linked where possible."""
    how = "hard links"
    made = 0
    rep = 0
    while made < n:
        folder = dest / f"r{rep:03d}"
        folder.mkdir(parents=True)
        for src in files[: n - made]:
            target = folder / src.name
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
                how = "copies"
            made += 1
        rep += 1
    return how


def run(engine: str, data: Path, out: Path, store: Path, batch: int) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    summary = backfill(data, out, engine=engine, store=store, batch_size=batch)
    return time.perf_counter() - t0, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("../shared/data/fullres"))
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--store", type=Path, default=Path("model_store"))
    ap.add_argument("--engines", default="local,ray")
    args = ap.parse_args()

    files = sorted(p for p in args.source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        print(f"no images under {args.source}", file=sys.stderr)
        return 2
    configure_logging("warning", "json", stream=sys.stderr)
    cores = os.cpu_count() or 1
    rows: list[tuple[str, str]] = []
    projections: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        root = Path(tmp)
        how = replicate(files, args.files, root / "big")
        replicate(files, args.small, root / "small")
        mb = sum(p.stat().st_size for p in (root / "big").rglob("*")) / 1e6
        print(
            f"{args.files} files ({mb:.0f} MB, {how} of {len(files)} full-resolution images), "
            f"batch {args.batch}, {cores} CPUs, model store {args.store}"
        )
        for engine in args.engines.split(","):
            ray_start = 0.0
            if engine == "ray":
                import ray

                t0 = time.perf_counter()
                ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
                ray_start = time.perf_counter() - t0
            try:
                t_small, s_small = run(
                    engine, root / "small", root / f"out-{engine}-small", args.store, args.batch
                )
                t_big, s_big = run(engine, root / "big", root / f"out-{engine}-big", args.store, args.batch)
            finally:
                if engine == "ray":
                    ray.shutdown()
            assert s_big["scored"] == args.files and s_small["scored"] == args.small, (s_small, s_big)
            steady = (args.files - args.small) / (t_big - t_small)
            fixed = max(0.0, t_small - args.small / steady) + ray_start
            per_core = steady / cores
            rows.append((engine, f"{t_big:8.1f} {args.files / t_big:8.1f} {steady:8.1f} {per_core:9.1f} "
                                 f"{fixed:8.1f} {ray_start:8.1f}"))  # fmt: skip
            projections.append((engine, per_core, fixed))
    print()
    head = ("seconds", "files/s", "steady", "per core", "fixed s", "ray up s")
    print(f"{'engine':7} " + " ".join(f"{h:>{9 if h == 'per core' else 8}}" for h in head))
    for engine, line in rows:
        print(f"{engine:7} {line}")
    print("  files/s: the whole run of all files; steady: files/s once running (from the two sizes);")
    print(
        "  fixed s: per-job cost (model load, actors start; Ray start-up included); ray up s: ray.init alone"
    )
    print()
    print("1,000,000 images, hours = fixed + 1e6 / (machines * cores * per-core rate):")
    combos = [(1, 16), (4, 16), (10, 32), (25, 64)]
    print(f"{'engine':7} " + " ".join(f"{f'{n}x{c} cores':>13}" for n, c in combos))
    for engine, per_core, fixed in projections:
        cells = []
        for n, c in combos:
            if engine == "local" and n > 1:
                cells.append(f"{'(one host)':>13}")
                continue
            hours = (fixed + 1e6 / (n * c * per_core)) / 3600
            cells.append(f"{hours:13.2f}")
        print(f"{engine:7} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
