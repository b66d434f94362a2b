"""Where the daemon's time goes: py-spy samples of ``run --once`` on full-resolution originals.

Usage (from the repo root; reads ../shared; needs ``pip install py-spy``):

    .venv/bin/python benchmarks/profile_run.py [--copies 6] [--repo .]

Copies the 80 originals ``--copies`` times into a fresh inbox (``--heatmaps``: with
``explain.enabled``), runs
``py-spy record --threads --format raw -- python -m watcher run --once`` from ``--repo``
(another checkout profiles another version), and prints the share of samples per stage
(every thread counted, idle threads waiting on a lock or queue left out) and the top leaf
functions.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

STAGES = [  # first match wins; each key is looked for in every frame of a sample's stack
    ("imports and start-up", ("importlib", "_find_and_load")),
    ("decode JPEG", ("_decode_raster", "_decode_reduced_jpeg", "imdecode")),
    ("heat map: thumbnail, overlay, PNG, write", ("thumbnail (", "overlay_png", "write_overlay")),
    ("resize + CLAHE (preprocess)", ("resize (", "equalize (", "scale_to_unit")),
    ("sha256", ("hexdigest", "sha256")),
    ("read file", ("read_file (",)),
    ("inference (TensorFlow)", ("tensorflow", "keras", "raw_probabilities", "predict_and_explain")),
    ("results.csv", ("report.py",)),
    ("claim / link / fsync / unlink", ("_claim", "_place_all", "_link", "fsync", "_sync_claims")),
    ("ingest (scan, settle)", ("ingest.py",)),
]
IDLE = ("wait (", "_wait_for_tstate_lock", "get (queue", "select", "sleep", "poll (", "acquire")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "fullres")
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--heatmaps", action="store_true", help="run with explain.enabled")
    args = ap.parse_args()
    originals = sorted(args.source.rglob("*.jpeg"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("inbox", "processed", "failed"):
            (root / name).mkdir()
        for c in range(args.copies):
            for p in originals:
                shutil.copy(p, root / "inbox" / f"{c}-{p.name}")
        (root / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "inbox": "inbox",
                    "processed": "processed",
                    "failed": "failed",
                    "results": "results.csv",
                    "model_store": str(args.store.resolve()),
                    "instance_id": "prof",
                    "ingest": {"settle_ms": 0},
                    "log": {"level": "warning"},
                    "batch": {"max_size": 32, "max_wait_ms": 500},
                    "explain": {"enabled": args.heatmaps},
                }
            )
        )
        raw = root / "raw.txt"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(args.repo.resolve())}
        t0 = time.perf_counter()
        subprocess.run(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--threads",
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--",
                sys.executable,
                "-m",
                "watcher",
                "run",
                "--once",
                "--config",
                str(root / "config.yaml"),
            ],
            check=True,
            env=env,
            cwd=args.repo,
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        lines = raw.read_text().splitlines()
    stage_count: collections.Counter[str] = collections.Counter()
    leaf_count: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1]
        if any(k in leaf for k in IDLE) or leaf.startswith("thread ("):
            continue
        count = int(n)
        total += count
        leaf_count[leaf.split(" (")[0] + " (" + leaf.split("/")[-1]] += count
        for name, keys in STAGES:
            if any(k in f for f in reversed(frames) for k in keys):
                stage_count[name] += count
                break
        else:
            stage_count["other Python"] += count
    print(f"{len(originals) * args.copies} files, run --once {wall:.1f} s (py-spy, start-up included)")
    print(f"busy samples: {total} (all threads; 100 Hz)")
    for name, count in stage_count.most_common():
        print(f"  {name:40} {100 * count / total:5.1f}%")
    print("top leaf functions:")
    for name, count in leaf_count.most_common(12):
        print(f"  {name[:90]:90} {100 * count / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
