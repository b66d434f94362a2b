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
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pynetdicom import AE  # noqa: E402
from throughput import Daemon, RowCounter, cpu_seconds, dicom_of, stream_latency, write_bench_config  # noqa: E402

AET = "XRAYWATCHER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
            cpu = [sum(cpu_seconds(listener.pid))]  # before the first C-STORE, after the last

            def store(ds: Any) -> None:
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0:
                    raise RuntimeError(f"C-STORE answered {status}")
                cpu[1:] = [sum(cpu_seconds(listener.pid))]

            lat, send_s = stream_latency(datasets, store, RowCounter(root / "results.csv"), daemon, args.rate)
            assoc.release()
        finally:
            listener.terminate()
            listener.wait(timeout=60)
            daemon.stop()
    lat = [1000 * x for x in lat]
    print(
        f"{len(lat)} instances at {args.rate:g}/s, heat maps {'on' if args.heatmaps else 'off'}: "
        f"C-STORE response to row p50 {statistics.median(lat):.0f} ms, "
        f"p95 {float(np.percentile(lat, 95)):.0f} ms, max {max(lat):.0f} ms; "
        f"sent in {send_s:.1f} s ({len(lat) / send_s:.1f} instances/s), "
        f"listener CPU {1000 * (cpu[-1] - cpu[0]) / len(lat):.1f} ms per instance"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
