"""Does the fast (DCT-scaled) JPEG decode change answers? Probabilities of both decodes, side by side.

Usage (from the repo root; reads ../shared, never used by the tests):

    .venv/bin/python benchmarks/decode_fidelity.py [--store model_store] [--version V]

For the 80 full-resolution originals (``../shared/data/fullres``) and for the validation split
the model version was chosen on (its ``training.split`` in metadata.json, rebuilt with
``watcher.splits``), every file is decoded twice: in full, and DCT-scaled to no less than twice
the model input (what the daemon does first). Prints, for the fast decode alone and for what
the daemon serves (a scaled decode scored in [m, 1 - m], m = ``decode.second_look_margin``, is
decoded again in full and scored again), the largest and mean probability difference, how many
labels change, and the validation metrics of the decodes; beside them the
*rounding floor*: the same full decode with +-1 grey level of noise after resizing, i.e. how
far the model's answers move for a change no larger than rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from watcher.config import DecodeConfig
from watcher.imaging import decode, input_floor, preprocess, resize
from watcher.inference import Predictor


def probabilities(predictor: Predictor, files: list[Path], fast: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities, and whether each file was decoded DCT-scaled (never, for ``fast=False``)."""
    floor = input_floor(predictor.spec) if fast else (0, 0)
    out, reduced = [], []
    for i in range(0, len(files), 64):
        batch = []
        for p in files[i : i + 64]:
            decoded = decode(p.read_bytes(), min_size=floor)
            reduced.append(decoded.reduced)
            batch.append(preprocess(decoded.image, predictor.spec))
        out.append(predictor.probabilities(np.stack(batch)))
    return np.concatenate(out), np.array(reduced, dtype=bool)


def rounding_floor(predictor: Predictor, files: list[Path], seed: int = 0) -> np.ndarray:
    """The full decode again, with +-1 grey level of noise added after resizing, before equalisation.

    Not a decoder: the size of a rounding-level change to the resized image (what any other
    correct resampler could produce), to read the fast path's differences against.
    """
    spec, rng, out = predictor.spec, np.random.default_rng(seed), []
    resized = dataclasses.replace(spec, effective_size=0)
    for i in range(0, len(files), 64):
        batch = []
        for p in files[i : i + 64]:
            img = decode(p.read_bytes(), min_size=(0, 0)).image
            if spec.effective_size > 0:
                img = resize(img, spec.effective_size, spec.effective_size)
            img = resize(img, spec.height, spec.width)
            img = np.clip(img.astype(np.int16) + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)
            batch.append(preprocess(img, resized))  # already at size: equalise and scale only
        out.append(predictor.probabilities(np.stack(batch)))
    return np.concatenate(out)


def report(
    name: str, predictor: Predictor, files: list[Path], labels: np.ndarray | None, margin: float
) -> None:
    full, _ = probabilities(predictor, files, fast=False)
    fast, reduced = probabilities(predictor, files, fast=True)
    # what the daemon serves: a scaled decode scored in [margin, 1 - margin] is decoded again in full
    again = reduced & (margin > 0) & (fast >= margin) & (fast <= 1 - margin)
    served = np.where(again, full, fast)
    print(f"{name}: {len(files)} files, {int(reduced.sum())} decoded DCT-scaled")
    for tag, p in (
        ("fast decode alone", fast),
        (f"served (second look in [{margin}, {1 - margin}])", served),
    ):
        diff = np.abs(full - p)
        flips = int(np.sum((full >= predictor.threshold) != (p >= predictor.threshold)))
        print(
            f"  {tag}: |p - p_full| max {diff.max():.4f}, mean {diff.mean():.5f}, "
            f"over 0.02: {int(np.sum(diff > 0.02))}; labels changed: {flips}"
        )
    print(f"  decoded again in full by the second look: {int(again.sum())} ({100 * again.mean():.1f}%)")
    noisy = np.abs(rounding_floor(predictor, files) - full)
    print(
        f"  rounding floor (full decode, +-1 grey level before equalisation): max {noisy.max():.4f}, "
        f"mean {noisy.mean():.5f}, over 0.02: {int(np.sum(noisy > 0.02))}"
    )
    if labels is not None:
        for tag, p in (("full decode", full), ("fast decode alone", fast), ("served", served)):
            called = p >= predictor.threshold
            sens = float(np.mean(called[labels == 1]))
            spec = float(np.mean(~called[labels == 0]))
            acc = float(np.mean(called == (labels == 1)))
            print(f"  {tag}: accuracy {acc:.4f}, sensitivity {sens:.4f}, specificity {spec:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("model_store"))
    ap.add_argument("--version")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument(
        "--margin", type=float, default=DecodeConfig().second_look_margin, help="decode.second_look_margin"
    )
    args = ap.parse_args()
    predictor = Predictor(args.store.resolve(), args.version)
    print(
        f"model {predictor.version}, input {predictor.spec.height}x{predictor.spec.width}, "
        f"fast decode floor {input_floor(predictor.spec)}"
    )
    fullres = sorted((args.data / "fullres").rglob("*.jpeg"))
    report("full-resolution originals", predictor, fullres, None, args.margin)

    from watcher.splits import list_samples, split_samples

    training = predictor.metadata.get("training") or predictor.metadata.get("weights", {}).get("training", {})
    split = training.get("split", {})  # a recalibrated version keeps its weights' training record
    samples = list_samples(args.data / "chest_xray" / "train")
    sp = split_samples(
        samples, split.get("method", "era"), split.get("val_fraction", 0.2), split.get("seed", 1337)
    )
    val = [samples[i] for i in sp.val]
    report(
        f"validation ({sp.method} split)",
        predictor,
        [s.path for s in val],
        np.array([s.label for s in val]),
        args.margin,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
