"""DICOM decode speed per transfer syntax and pixel plugin, next to a JPEG of the same image.

Usage (from the repo root; may read ../shared, never used by the tests):

    .venv/bin/python benchmarks/dicom_decode.py [--image ../shared/data/fullres/X.jpeg] [--repeat 5]

One radiograph (default: the first of tests/fixtures/fullres) is written as 12-bit DICOM
(8-bit for JPEG Baseline) in every transfer syntax that can be written here; JPEG Extended
12-bit comes from pydicom's shipped JPGExtended.dcm (a different, 1024x256 image). For each
it prints the ms per file of ``watcher.imaging.decode`` (read, checks, pixels, grey pipeline),
of each available pydicom plugin alone (``pixel_array``), and of ``decode_bytes`` on a q90
JPEG of the same image.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import pydicom
from pydicom import uid
from pydicom.pixels.decoders.base import get_decoder

from tests.test_dicom import dicom_file, shipped, stretched
from watcher import dicom
from watcher.imaging import decode, decode_bytes

SYNTAXES = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
]


def ms_per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plugin_ms(data: bytes, plugin: str, repeat: int) -> str:
    """ms of pydicom's ``pixel_array`` with one plugin, or why it failed."""

    def run() -> None:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.pixel_array_options(decoding_plugin=plugin)
        ds.pixel_array  # noqa: B018

    try:
        return f"{ms_per_call(run, repeat):.1f}"
    except Exception as exc:
        return f"fails ({' '.join(str(exc).split())[-60:]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = sorted((Path(__file__).resolve().parent.parent / "tests/fixtures/fullres").glob("*.jpeg"))[0]
    ap.add_argument("--image", type=Path, default=default)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    grey = cv2.imread(str(args.image), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        print(f"cannot read {args.image}", file=sys.stderr)
        return 1
    grey12 = grey.astype(np.uint16) * 16
    size = f"{grey.shape[1]}x{grey.shape[0]}"
    print(f"image {args.image.name}: {size}, repeat {args.repeat}, median ms per file")
    header = f"{'transfer syntax':<52} {'KB':>6} {'decode':>7} {'JPEG':>6}  used / plugins alone"
    print(header)
    print("-" * len(header))
    for syntax in SYNTAXES:
        if syntax == uid.JPEGExtended12Bit:
            ds = pydicom.dcmread(shipped("JPGExtended.dcm"))
            ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
            buf = io.BytesIO()
            ds.save_as(buf)
            data, note = buf.getvalue(), " (pydicom JPGExtended.dcm, 1024x256)"
        elif syntax == uid.JPEGBaseline8Bit:
            data, note = dicom_file(grey, 8, syntax), ""
        else:
            data, note = dicom_file(grey12, 12, syntax), ""
        image = decode(data).image
        if syntax.is_compressed is False and syntax != uid.JPEGBaseline8Bit:
            assert np.array_equal(stretched(grey), image), syntax.name
        ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        jpeg_bytes = jpg.tobytes()
        ms = ms_per_call(lambda d=data: decode(d), args.repeat)
        jpeg_ms = ms_per_call(lambda j=jpeg_bytes: decode_bytes(j), args.repeat)
        decoder = get_decoder(syntax)
        plugins = decoder.available_plugins if syntax.is_encapsulated else ("native",)
        used = dicom.decoding_plugin(syntax, 12) or "native"
        alone = ", ".join(f"{p} {plugin_ms(data, '' if p == 'native' else p, args.repeat)}" for p in plugins)
        lacking = decoder.missing_dependencies
        missing = "; missing: " + ", ".join(lacking) if lacking else ""
        print(f"{syntax.name[:52]:<52} {len(data) / 1024:>6.0f} {ms:>7.1f} {jpeg_ms:>6.1f}  {used} / {alone}"
              f"{missing}{note}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
