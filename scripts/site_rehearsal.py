"""Rehearse issue 8's go-live check at a simulated new site, through the real commands.

    .venv/bin/python scripts/site_rehearsal.py --data ../shared/data/chest_xray/train \
        --probe aspect_0.79 --work runs/rehearsal

What a site does, and how it is checked: ``xray-watcher calibrate`` on 100 labelled images
(50 per class, each of a different patient) of a population the model has not seen, promoted,
then the rest of that population dropped into the inbox of a daemon (``run --once``), and
its rows compared with the labels. The population: the era split's validation patients (the
shipped versions never trained on them), every image changed by ``--probe`` (a fixed
acquisition shift of ``watcher.augment.PROBES``, ``none`` for the images as they are). The
sample's patients are left out of the scored rest. The base version is scored on the same
rest in a second daemon run, so the table shows what calibration changed.

Nothing is written outside ``--work`` (a copy of the base version is calibrated there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score

from watcher import model_store
from watcher.augment import PROBES
from watcher.report import results_files
from watcher.splits import list_samples, split_samples

CLASSES = ("NORMAL", "PNEUMONIA")


def write_population(data: Path, work: Path, probe: str, per_class: int, seed: int) -> dict[str, int]:
    """``work/sample/<CLASS>/`` (``per_class`` images, one per patient) and ``work/rest/``
    (every other era-validation patient's images, flat), the probe applied; returns the rest's
    labels by file name."""
    samples = list_samples(data)
    val = [samples[i] for i in split_samples(samples, "era", 0.2, 1337).val]
    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}  # group -> the one file of that patient in the sample
    for label in (0, 1):
        groups = sorted({v.group for v in val if v.label == label})
        rng.shuffle(groups)
        for g in groups[:per_class]:
            files = sorted(str(v.path) for v in val if v.group == g)
            chosen[g] = files[int(rng.integers(len(files)))]
    fn, classes = PROBES[probe] if probe != "none" else (None, ())
    labels: dict[str, int] = {}
    for v in val:
        if v.group in chosen and chosen[v.group] != str(v.path):
            continue  # the sample patient's other images: neither sample nor rest
        if v.group in chosen:
            out = work / "sample" / CLASSES[v.label] / v.path.name
        else:
            out = work / "rest" / v.path.name
            labels[v.path.name] = v.label
        out.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(v.path), cv2.IMREAD_GRAYSCALE)
        if fn is not None and v.label in classes:
            img = fn(img)
        cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return labels


def score_rest(exe: Path, work: Path, store: Path, name: str) -> pd.DataFrame:
    """Every image of ``work/rest`` through ``run --once`` of a daemon serving ``store``."""
    site = work / name
    shutil.rmtree(site, ignore_errors=True)
    for sub in ("inbox", "processed", "failed"):
        (site / sub).mkdir(parents=True)
    for f in sorted((work / "rest").iterdir()):
        shutil.copyfile(f, site / "inbox" / f.name)
    (site / "config.yaml").write_text(
        f"inbox: inbox\nprocessed: processed\nfailed: failed\nresults: results.csv\n"
        f"model_store: {store.resolve()}\nexplain:\n  enabled: false\nreview:\n  page: ''\n"
        f"instance_id: rehearsal-{name}\n"
    )
    with open(site / "run.log", "wb") as log:
        subprocess.run(
            [str(exe), "run", "--once", "--config", str(site / "config.yaml")], check=True, stdout=log
        )
    frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in results_files(site / "results.csv")]
    return pd.concat(frames, ignore_index=True)


def figures(rows: pd.DataFrame, labels: dict[str, int]) -> dict[str, float | int | str]:
    ok = rows[rows["status"] == "ok"]
    y = np.array([labels[f] for f in ok["file"]])
    called = (ok["label"] == "PNEUMONIA").to_numpy().astype(int)
    tn, fp, fn, tp = confusion_matrix(y, called, labels=[0, 1]).ravel()
    return {
        "model_version": ",".join(sorted(set(ok["model_version"]))),
        "rows": len(rows),
        "failed": int((rows["status"] != "ok").sum()),
        "NORMAL": int((y == 0).sum()),
        "PNEUMONIA": int((y == 1).sum()),
        "accuracy": float((tp + tn) / len(y)),
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
        "roc_auc": float(roc_auc_score(y, ok["probability"].astype(float))),
        "threshold": ",".join(sorted(set(ok["threshold"]))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, required=True, help="the labelled training folder (NORMAL/, PNEUMONIA/)"
    )
    ap.add_argument("--store", type=Path, default=Path("model_store"))
    ap.add_argument("--base", help="version to calibrate (default: the store's current one)")
    ap.add_argument("--probe", default="aspect_0.79", choices=["none", *PROBES])
    ap.add_argument("--per-class", type=int, default=50, help="sample images per class (one per patient)")
    ap.add_argument("--seed", type=int, default=0, help="which patients make the sample")
    ap.add_argument("--work", type=Path, default=Path("runs/rehearsal"))
    args = ap.parse_args()

    exe = Path(sys.executable).parent / "xray-watcher"
    base = args.base or model_store.current_version(args.store)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    labels = write_population(args.data, args.work, args.probe, args.per_class, args.seed)

    store = args.work / "store"
    store.mkdir()
    shutil.copytree(args.store / base, store / base, symlinks=True)
    model_store.set_current(store, base, reason="site rehearsal: the base version")
    base_rows = score_rest(exe, args.work, store, "base")
    subprocess.run(
        [
            str(exe),
            "calibrate",
            "--data",
            str(args.work / "sample"),
            "--store",
            str(store),
            "--base",
            base,
            "--promote",
        ],
        check=True,
    )
    calibrated = model_store.current_version(store)
    cal_rows = score_rest(exe, args.work, store, "calibrated")

    table = {"probe": args.probe, "seed": args.seed, "base": figures(base_rows, labels)}
    table["calibrated"] = figures(cal_rows, labels)
    if table["calibrated"]["model_version"] != calibrated:  # e.g. a fallback: not what was asked
        raise SystemExit(f"the rest was scored by {table['calibrated']['model_version']}, not {calibrated}")
    meta = json.loads((store / str(calibrated) / "metadata.json").read_text())
    table["calibrated"]["cross_validated_on_sample"] = json.dumps(meta.get("validation", {}))
    (args.work / "figures.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
