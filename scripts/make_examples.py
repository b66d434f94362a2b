"""Make the documentation pictures of the Grad-CAM heat maps and the review page.

    .venv/bin/python scripts/make_examples.py [--store model_store] [--version v0002]

Writes, with the shipped model:
- docs/img/heatmap_normal.png, docs/img/heatmap_pneumonia.png: overlays of one full-resolution
  NORMAL and one PNEUMONIA radiograph (tests/fixtures/fullres, or ../shared/data/fullres);
- docs/img/review.png: a headless-Chromium screenshot of the review page a live ``run --once``
  writes for the fixtures (heat maps on, a truncated file, an adult's DICOM without extension)
  (needs chromium: scripts/ensure-chromium.sh);
and prints the cost of predict_and_explain against plain predict_on_batch at batch 16, and,
when ../shared/data/chest_xray/train exists, the mean border mass fraction of the maps on
validation images (the version's own split, at most --max-val images) called PNEUMONIA.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import dicom_of  # noqa: E402
from watcher.explain import GradCam, border_mass_fraction, overlay_png, write_overlay  # noqa: E402
from watcher.imaging import GreyImage, decode_image, preprocess, resize  # noqa: E402
from watcher.inference import Predictor, calibrate  # noqa: E402
from watcher.splits import list_samples, split_samples  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "img"
THUMB = 384  # larger than the daemon's 256 px overlays, for a legible README picture


def thumbnail(img: GreyImage, size: int = THUMB) -> GreyImage:
    """Shrink so the longer side is at most ``size`` (keeps the aspect ratio)."""
    h, w = img.shape
    scale = min(1.0, size / max(h, w))
    return resize(img, max(1, round(h * scale)), max(1, round(w * scale)))


Explained = tuple[GreyImage, float, np.ndarray]


def explain_files(pred: Predictor, cam: GradCam, paths: list[Path]) -> list[Explained]:
    """Decode, score (calibrated) and explain files in batches of 16."""
    out: list[Explained] = []
    for i in range(0, len(paths), 16):
        images = [decode_image(p) for p in paths[i : i + 16]]
        raw, maps = cam.predict_and_explain(np.stack([preprocess(im, pred.spec) for im in images]))
        probs = calibrate(raw, pred.temperature, pred.logit_shift)
        out.extend(zip(images, (float(p) for p in probs), maps, strict=True))
    return out


def heatmap_examples(pred: Predictor, cam: GradCam) -> None:
    folder = ROOT / "tests" / "fixtures" / "fullres"
    if not any(folder.glob("*.jpeg")):
        folder = SHARED / "fullres"
    paths = sorted(folder.glob("*.jpeg"))
    normal = next(p for p in paths if "IM-" in p.name)
    pneumonia = next(p for p in paths if p.name.startswith("person"))
    for name, path in (("normal", normal), ("pneumonia", pneumonia)):
        ((image, prob, cam_map),) = explain_files(pred, cam, [path])
        label = pred.label_for(prob)
        png = overlay_png(thumbnail(image), cam_map, label, prob, pred.threshold, compress=True)
        write_overlay(OUT / f"heatmap_{name}.png", png)
        print(
            f"heatmap_{name}.png: {path.name} {image.shape[1]}x{image.shape[0]} -> {label} p={prob:.3f}, "
            f"border fraction {border_mass_fraction(cam_map):.3f}, {len(png) / 1024:.0f} KiB"
        )


def chromium_screenshot(page: Path, shot: Path, height: int) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("review.png skipped: chromium is not installed (scripts/ensure-chromium.sh)")
        return
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--hide-scrollbars",
            f"--screenshot={shot}", f"--window-size=1280,{height}", page.as_uri(),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def review_example(store: Path) -> None:
    """The page a live daemon writes: `xray-watcher run --once` with heat maps on, fixtures in."""
    import shutil
    import subprocess
    import sys

    import yaml

    fixtures = sorted((ROOT / "tests" / "fixtures" / "train").glob("*/*.jpeg"))[::2]
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        for name in ("inbox", "processed", "failed"):
            (site / name).mkdir()
        for p in fixtures:
            shutil.copy(p, site / "inbox" / p.name)
        (site / "inbox" / "scan_0042.jpeg").write_bytes(fixtures[0].read_bytes()[:3000])  # truncated
        adult = cv2.imread(str(fixtures[-1]), cv2.IMREAD_GRAYSCALE)
        (site / "inbox" / "CR000117").write_bytes(dicom_of(adult, "058Y"))  # DICOM without extension
        config = {
            "inbox": "inbox", "processed": "processed", "failed": "failed", "results": "results.csv",
            "model_store": str(store.resolve()), "instance_id": "example", "log": {"level": "warning"},
            "explain": {"enabled": True},
        }  # fmt: skip
        (site / "config.yaml").write_text(yaml.safe_dump(config))
        subprocess.run(
            [sys.executable, "-m", "watcher", "run", "--once", "--config", str(site / "config.yaml")],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
        page = site / "review.html"
        shot = site / "review.png"
        chromium_screenshot(page, shot, 1400)
        if shot.exists():
            img = np.asarray(cv2.imread(str(shot), cv2.IMREAD_COLOR))
            size = (960, round(img.shape[0] * 960 / img.shape[1]))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
            assert ok
            write_overlay(OUT / "review.png", bytes(buf.tobytes()))
            print(f"review.png: {img.shape[1]}x{img.shape[0]}, {len(buf) / 1024:.0f} KiB")


def cost(pred: Predictor, cam: GradCam, batch: np.ndarray, repeats: int = 10) -> None:
    """Median wall time per file at this batch size: plain forward pass vs score + explain."""
    batch = batch[:16]
    for _ in range(2):
        pred.model.predict_on_batch(batch)
        cam.predict_and_explain(batch)
    plain, both = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.model.predict_on_batch(batch)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        cam.predict_and_explain(batch)
        both.append(time.perf_counter() - t)
    p, b = np.median(plain) * 1000 / len(batch), np.median(both) * 1000 / len(batch)
    print(
        f"cost at batch {len(batch)} on CPU ({os.cpu_count()} cores): predict_on_batch {p:.2f} ms/file, "
        f"predict_and_explain {b:.2f} ms/file ({b / p:.1f}x)"
    )


def validation_border(pred: Predictor, cam: GradCam, max_val: int) -> None:
    data = SHARED / "chest_xray" / "train"
    if not data.is_dir():
        print(f"border fraction on validation skipped: {data} not found")
        return
    split_meta = pred.metadata.get("training", {}).get("split", {})
    samples = list_samples(data)
    split = split_samples(
        samples,
        split_meta.get("method", "era"),
        float(split_meta.get("val_fraction", 0.2)),
        int(split_meta.get("seed", 1337)),
    )
    val = [samples[i] for i in split.val]
    if len(val) > max_val:  # an even spread over the (sorted, class-ordered) list keeps the class mix
        val = [val[round(i * len(val) / max_val)] for i in range(max_val)]
    results = explain_files(pred, cam, [s.path for s in val])
    fractions = [
        border_mass_fraction(m)
        for (_, prob, m) in results
        if prob >= pred.threshold  # called PNEUMONIA
    ]
    truth = np.array([s.label for s in val])
    called = np.array([p >= pred.threshold for (_, p, _) in results])
    f = np.array(fractions)
    print(
        f"border mass fraction (outer 10%, flat map 0.36) on {len(f)} of {len(val)} {split.method}-split "
        f"validation images called PNEUMONIA: mean {f.mean():.3f}, median {np.median(f):.3f}, "
        f"90th percentile {np.percentile(f, 90):.3f}, above 0.5: {(f > 0.5).mean():.1%} "
        f"(accuracy on these {len(val)}: {(called == truth.astype(bool)).mean():.3f})"
    )
    batch = np.stack([preprocess(decode_image(s.path), pred.spec) for s in val[:16]])
    cost(pred, cam, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--version", default=None, help="default: the store's current version")
    ap.add_argument("--max-val", type=int, default=300)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    pred = Predictor(args.store, args.version)
    cam = GradCam(pred.model)
    shape = tuple(cam.grad_model.outputs[0].shape)
    print(f"model {pred.version}: Grad-CAM on layer {cam.layer_name} {shape}")
    heatmap_examples(pred, cam)
    review_example(args.store)
    validation_border(pred, cam, args.max_val)
    if not (SHARED / "chest_xray" / "train").is_dir():
        fixtures = sorted((ROOT / "tests" / "fixtures" / "train").glob("*/*.jpeg"))[:16]
        cost(pred, cam, np.stack([preprocess(decode_image(p), pred.spec) for p in fixtures]))


if __name__ == "__main__":
    main()
