"""Throughput of ``run --once`` against what the machine can decode and infer.

Usage (from the repo root; reads ../shared, never used by the tests):

    .venv/bin/python benchmarks/throughput.py [--source ../shared/data/fullres] [--repeat 1]
        [--batch 16] [--workers 2] [--store model_store]

Prints three figures for the same files: decode+preprocess alone (files/s with ``workers``
threads), inference alone (files/s on preprocessed batches), and the whole service
(``Service.run(once=True)``: claim, read, hash, decode, preprocess, infer, CSV row, move).
The model is loaded before timing starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from watcher.config import load_config  # noqa: E402
from watcher.imaging import decode_image, preprocess  # noqa: E402
from watcher.inference import Predictor  # noqa: E402
from watcher.logs import configure_logging  # noqa: E402
from watcher.service import Service  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("../shared/data/fullres"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store", type=Path, default=Path("model_store"))
    ap.add_argument("--version", default=None)
    args = ap.parse_args()

    files = sorted(p for p in args.source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        print(f"no images under {args.source}", file=sys.stderr)
        return 2
    predictor = Predictor(args.store.resolve(), args.version)
    n = len(files) * args.repeat
    mb = sum(p.stat().st_size for p in files) * args.repeat / 1e6
    print(f"model {predictor.version} ({predictor.metadata.get('architecture')}), input "
          f"{predictor.spec.height}x{predictor.spec.width}, {n} files ({mb:.1f} MB), batch {args.batch}, "
          f"{args.workers} decode workers, {os.cpu_count()} CPUs")

    # 1. decode + preprocess alone
    work = files * args.repeat
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        inputs = list(pool.map(lambda p: preprocess(decode_image(p), predictor.spec), work))
    decode_s = time.perf_counter() - t0

    # 2. inference alone (one warm-up batch first)
    batch = np.stack(inputs[: args.batch])
    predictor.probabilities(batch)
    t0 = time.perf_counter()
    for i in range(0, n, args.batch):
        predictor.probabilities(np.stack(inputs[i : i + args.batch]))
    infer_s = time.perf_counter() - t0

    # 3. the whole service, run --once
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("inbox", "processed", "failed"):
            (root / name).mkdir()
        for r in range(args.repeat):
            for p in files:
                shutil.copy(p, root / "inbox" / f"{r}-{p.name}")
        cfg_path = root / "config.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "inbox": "inbox", "processed": "processed", "failed": "failed", "results": "results.csv",
            "model_store": str(args.store.resolve()), "instance_id": "bench",
            "batch": {"max_size": args.batch, "max_wait_ms": 200},
            "decode": {"workers": args.workers}, "ingest": {"settle_ms": 0},
            "log": {"level": "warning"},
        }))
        configure_logging("warning", "json")
        cfg = load_config(cfg_path)
        t0 = time.perf_counter()
        Service(cfg, predictor=predictor).run(once=True)
        service_s = time.perf_counter() - t0
        rows = sum(1 for _ in open(root / "results.csv")) - 1  # noqa: SIM115

    print(f"{'stage':28} {'seconds':>8} {'files/s':>8}")
    print(f"{'decode+preprocess':28} {decode_s:8.2f} {n / decode_s:8.1f}")
    print(f"{'inference':28} {infer_s:8.2f} {n / infer_s:8.1f}")
    print(f"{'run --once (whole service)':28} {service_s:8.2f} {n / service_s:8.1f}   ({rows} rows)")
    bound = 1 / (1 / (n / decode_s) + 1 / (n / infer_s))
    print(f"serial bound decode+infer: {bound:.1f} files/s; overlap ideal: {min(n / decode_s, n / infer_s):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
