"""Latency from a DICOM C-STORE to its results.csv row, through a real listener and daemon.

Usage (from the repo root; reads ../shared, never used by the tests):

    .venv/bin/python benchmarks/listener_latency.py [--count 20] [--rate 2] [--heatmaps]

Starts ``xray-watcher run`` and ``xray-watcher listen`` on one temporary config (the shipped
model store), sends ``--count`` DX instances made from the full-resolution originals (explicit
VR little endian, 8-bit), one association, ``--rate`` a second, and prints the time from each
C-STORE response to its row in results.csv: p50, p95 and max. Until 2026-11-26 the listener
hard-linked each instance into the inbox and every one waited ``ingest.settle_ms`` (1 s).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pynetdicom import AE  # noqa: E402
from throughput import Daemon, cpu_seconds, dicom_of, write_bench_config  # noqa: E402

AET = "XRAYWATCHER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rows_by_file(results: Path) -> set[str]:
    """File names with a complete row in results.csv so far."""
    if not results.exists():
        return set()
    with open(results, newline="") as fh:
        return {r["file"] for r in csv.DictReader(fh) if r.get("heatmap") is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "fullres")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--rate", type=float, default=2.0, help="instances a second")
    ap.add_argument("--heatmaps", action="store_true", help="run the daemon with explain.enabled")
    args = ap.parse_args()
    originals = sorted(args.source.rglob("*.jpeg"))
    if not originals:
        print(f"no images under {args.source}", file=sys.stderr)
        return 2
    datasets = []
    for i in range(args.count):
        image = cv2.imread(str(originals[i % len(originals)]), cv2.IMREAD_GRAYSCALE)
        datasets.append(pydicom.dcmread(io.BytesIO(dicom_of(image))))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        listener_cfg = {"host": "127.0.0.1", "port": port, "ae_title": AET}
        write_bench_config(root, args.store, args.heatmaps, listener=listener_cfg)
        daemon = Daemon(root / "config.yaml", root / "notify.sock")
        with open(root / "listener.log", "wb") as out:
            listener = subprocess.Popen(
                [sys.executable, "-m", "watcher", "listen", "--config", str(root / "config.yaml")],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        stored: dict[str, float] = {}
        seen: dict[str, float] = {}
        try:
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
            deadline = time.monotonic() + 60
            while True:
                assoc = ae.associate("127.0.0.1", port, ae_title=AET)
                if assoc.is_established:
                    break
                if time.monotonic() > deadline or listener.poll() is not None:
                    print((root / "listener.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)

            def poll_until(until: float) -> None:
                while time.monotonic() < until and len(seen) != len(datasets):
                    for name in rows_by_file(root / "results.csv") - seen.keys():
                        seen[name] = time.monotonic()
                    time.sleep(0.003)

            cpu0 = sum(cpu_seconds(listener.pid))
            due = t_first = time.monotonic()
            for ds in datasets:
                poll_until(due)
                status = assoc.send_c_store(ds)
                stored[f"{ds.SOPInstanceUID}.dcm"] = time.monotonic()
                if getattr(status, "Status", None) != 0:
                    print(f"C-STORE answered {status}", file=sys.stderr)
                    return 1
                due += 1.0 / args.rate
            send_s = time.monotonic() - t_first
            listener_ms = 1000 * (sum(cpu_seconds(listener.pid)) - cpu0) / len(datasets)
            assoc.release()
            poll_until(time.monotonic() + 60)
        finally:
            listener.terminate()
            listener.wait(timeout=60)
            daemon.stop()
    missing = set(stored) - set(seen)
    if missing:
        print(f"{len(missing)} of {len(stored)} instances got no row within 60 s", file=sys.stderr)
        return 1
    lat = [1000 * (seen[k] - stored[k]) for k in stored]
    print(
        f"{len(lat)} instances at {args.rate:g}/s, heat maps {'on' if args.heatmaps else 'off'}: "
        f"C-STORE response to row p50 {statistics.median(lat):.0f} ms, "
        f"p95 {float(np.percentile(lat, 95)):.0f} ms, max {max(lat):.0f} ms; "
        f"sent in {send_s:.1f} s ({len(lat) / send_s:.1f} instances/s), "
        f"listener CPU {listener_ms:.1f} ms per instance"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
