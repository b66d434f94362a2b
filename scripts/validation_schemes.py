"""Measure calibration / threshold schemes of v0002 under simulated new-site shifts (no retraining).

    .venv/bin/python scripts/validation_schemes.py --data ../shared/data/chest_xray/train \
        --store model_store --version v0002 --out runs/schemes

Only the era split's validation patients are used (v0002 was trained on the rest; its random
split would overlap its training images). On them:

- cross-fitting: patients split in two halves (stratified, grouped, 20 repeats); a scheme is
  fitted on one half (clean images) and measured on the other, under each condition:
  ``clean``; every acquisition probe of ``watcher.augment.PROBES`` applied to the measured
  half; the measured half re-weighted to 50% and 62% PNEUMONIA (sensitivity and
  specificity do not change with the mix, ECE does);
- leave-era-out: fitted on the newer half of the era-validation patients (per class, by id
  rank), measured on the older half;
- site recalibration: on each shifted measured half, ``calibrate``'s fit on a labelled
  sample of 60 NORMAL + 60 PNEUMONIA patients' images, measured on the rest of that half.

Schemes: (a) Platt on the sample's mix + max Youden J with sensitivity >= 0.97 (v0002's);
(b) class-balanced Platt (prevalence 0.5) + best specificity with sensitivity >= 0.97;
(b+m) (b) with a 0.01 margin on the floor; (c) (b) on test-time-augmented scores (mean
logit over ``watcher.augment.TTA_VARIANTS``; TTA scored for the clean images and the six
acquisition probes, the other probes keep the plain scores). Raw scores are cached per
condition in OUT/scores/.

A deep ensemble of versions already measured: ``--combine OUT_A OUT_B --out OUT_ENS`` scores
the mean logit of their cached scores (``--store``/``--version`` still name one member, whose
model is loaded but not used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from watcher import calibration, drift, model_store
from watcher.augment import PROBES, TTA_VARIANTS
from watcher.evaluation import reliability_bins
from watcher.inference import Predictor, calibrate
from watcher.splits import _era_scores, list_samples, patient_id, split_samples
from watcher.train import load_images, preprocess_all

FLOOR = 0.97


def raw_scores(pred: Predictor, images: list[Any]) -> np.ndarray:
    x = preprocess_all(images, pred.spec)
    return np.concatenate(
        [np.asarray(pred.model.predict_on_batch(x[i : i + 128])).reshape(-1) for i in range(0, len(x), 128)]
    ).astype(np.float64)


TTA_CONDITIONS = ("clean", "lower_resolution_0.5", "blur_sigma_1.2", "jpeg_q30", "gamma_0.7", "contrast_0.7")


def compute_scores(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Raw v0002 outputs on the era-validation images, clean, per probe and TTA (cached per condition)."""
    cache = out / "scores"
    cache.mkdir(exist_ok=True)
    samples = list_samples(args.data)
    split = split_samples(samples, "era", 0.2, 1337)
    val = [samples[i] for i in split.val]
    images, val, _ = load_images(val)
    labels = np.array([s.label for s in val])
    era = _era_scores([s.path.name for s in val])
    res: dict[str, Any] = {
        "labels": labels,
        "groups": np.array([s.group for s in val]),
        "age": np.array([era[patient_id(s.path.name)] for s in val]),
    }
    pred = Predictor(args.store, args.version)
    t0 = time.monotonic()
    for name in ("clean", *PROBES):
        path = cache / f"{name}.npz"
        if not path.exists():
            if name == "clean":
                changed = images
            else:
                fn, classes = PROBES[name]
                changed = [
                    fn(im) if int(lab) in classes else im for im, lab in zip(images, labels, strict=True)
                ]
            raw = raw_scores(pred, changed)
            logits = [calibration.logit(raw)]
            if name in TTA_CONDITIONS:
                for v in TTA_VARIANTS:
                    if v != "identity":
                        logits.append(
                            calibration.logit(raw_scores(pred, [TTA_VARIANTS[v](im) for im in changed]))
                        )
            np.savez(path, raw=raw, tta=calibration.sigmoid(np.mean(logits, axis=0)))
            print(f"scored {name} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        z = np.load(path)
        res[f"raw:{name}"], res[f"tta:{name}"] = z["raw"], z["tta"]
    return res


def combine_members(members: list[Path], out: Path) -> None:
    """OUT/scores of a deep ensemble: per condition, the mean logit of the members' cached scores.

    Each member is the ``--out`` folder of an earlier run of this script on another version
    (same data, so the same images in the same order).
    """
    cache = out / "scores"
    cache.mkdir(parents=True, exist_ok=True)
    for path in sorted((members[0] / "scores").glob("*.npz")):
        zs = [np.load(m / "scores" / path.name) for m in members]
        if len({z["raw"].size for z in zs}) != 1:
            raise SystemExit(f"{path.name}: the members scored different images")
        mean = {k: np.mean([calibration.logit(z[k]) for z in zs], axis=0) for k in ("raw", "tta")}
        np.savez(cache / path.name, **{k: calibration.sigmoid(v) for k, v in mean.items()})


def weighted_ece(y: np.ndarray, p: np.ndarray, prevalence: float | None) -> float:
    """ECE with class weights that re-mix the sample to ``prevalence`` (None: as it is)."""
    if prevalence is None:
        w = np.ones(y.size)
    else:
        w = np.where(y == 1, prevalence / max(y.sum(), 1), (1 - prevalence) / max((1 - y).sum(), 1))
    bins = np.searchsorted(np.linspace(0, 1, 11)[1:-1], p)
    total = 0.0
    for b in range(10):
        m = bins == b
        if m.any():
            total += w[m].sum() * abs(np.average(y[m], weights=w[m]) - np.average(p[m], weights=w[m]))
    return float(total / w.sum())


SCHEMES = {
    "a_current": {"prior": "validation", "rule": "youden_floor", "margin": 0.0, "scores": "raw"},
    "b_balanced": {"prior": "balanced", "rule": "max_specificity", "margin": 0.0, "scores": "raw"},
    "b_margin": {"prior": "balanced", "rule": "max_specificity", "margin": 0.01, "scores": "raw"},
    "c_tta": {"prior": "balanced", "rule": "max_specificity", "margin": 0.0, "scores": "tta"},
}


def fit(scheme: dict[str, Any], y: np.ndarray, raw: np.ndarray) -> tuple[calibration.Calibration, float]:
    cal = calibration.fit_calibration(y, raw, scheme["prior"])
    thr = calibration.choose_threshold(y, cal.apply(raw), FLOOR, rule=scheme["rule"], margin=scheme["margin"])
    return cal, thr


def measure(cal: calibration.Calibration, thr: float, y: np.ndarray, raw: np.ndarray) -> dict[str, float]:
    p = cal.apply(raw)
    called = p >= thr
    out = {
        "sensitivity": float(called[y == 1].mean()),
        "specificity": float((~called[y == 0]).mean()),
        "ece_as_is": weighted_ece(y, p, None),
    }
    for prev in (0.5, 0.62):
        out[f"ece_{prev}"] = weighted_ece(y, p, prev)
        shifted = calibration.shift_for_prevalence(cal, prev).apply(raw)
        out[f"ece_{prev}_prior_shift"] = weighted_ece(y, shifted, prev)
    out["threshold"] = thr
    return out


def halves(labels: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.zeros(labels.size, dtype=bool)
    for c in (0, 1):
        gs = np.unique(groups[labels == c])
        rng.shuffle(gs)
        a |= np.isin(groups, gs[: len(gs) // 2])
    return np.where(a)[0], np.where(~a)[0]


def site_subsample(
    labels: np.ndarray, groups: np.ndarray, idx: np.ndarray, per_class: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    chosen = []
    for c in (0, 1):
        gs = np.unique(groups[idx][labels[idx] == c])
        rng.shuffle(gs)
        chosen.append(gs[:per_class])
    mask = np.isin(groups[idx], np.concatenate(chosen))
    return mask


def write_site_demo(data: Path, root: Path, probe: str = "aspect_0.79", per_class: int = 60) -> None:
    """Folders for the ``calibrate`` demonstration (era-validation patients only).

    ``root/era_val``: links to the era-validation images as they are; ``root/sample``: the
    images of ``per_class`` patients per class with ``probe`` applied (a simulated new site's
    labelled sample); ``root/holdout``: the other era-validation patients, same probe.
    """
    import cv2

    samples = list_samples(data)
    val = [samples[i] for i in split_samples(samples, "era", 0.2, 1337).val]
    rng = np.random.default_rng(0)
    chosen: set[str] = set()
    for label in (0, 1):
        groups = sorted({v.group for v in val if v.label == label})
        rng.shuffle(groups)
        chosen |= set(groups[:per_class])
    fn, classes = PROBES[probe]
    for v in val:
        cls = ("NORMAL", "PNEUMONIA")[v.label]
        link = root / "era_val" / cls / v.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(v.path.resolve())
        out = root / ("sample" if v.group in chosen else "holdout") / cls / v.path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(v.path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out), fn(img) if v.label in classes else img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def one_per_patient(
    labels: np.ndarray, groups: np.ndarray, idx: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Within ``idx``: ``per_class`` images per class, one per patient (a site's labelled sample),
    and the images of every other patient (the rest it then scores); positions into ``idx``."""
    rng = np.random.default_rng(seed + 2000)
    sample, chosen = [], []
    for c in (0, 1):
        gs = np.unique(groups[idx][labels[idx] == c])
        rng.shuffle(gs)
        for g in gs[:per_class]:
            members = np.where(groups[idx] == g)[0]
            sample.append(int(rng.choice(members)))
            chosen.append(g)
    rest = np.where(~np.isin(groups[idx], chosen))[0]
    return np.asarray(sample), rest


def small_site_study(
    args: argparse.Namespace, s: dict[str, Any], y: np.ndarray, groups: np.ndarray, conditions: list[str]
) -> dict[str, Any]:
    """Issue 8's go-live check, simulated: ``calibrate`` on 50 + 50 images (one per patient) of
    the measured half under each condition, calls on the rest of that half. The threshold by
    the plain sample rule and by ``site.site_threshold`` anchored on the version's own cut; and
    the version as it is. Per condition: means and the share of draws that pass (accuracy >=
    0.95 with sensitivity >= 0.95 on the rest)."""
    from watcher import site

    meta = model_store.read_metadata(args.store, args.version)
    cut = site.base_raw_cut(
        float(meta["threshold"]), float(meta.get("temperature", 1.0)), float(meta.get("logit_shift", 0.0))
    )
    draws: dict[tuple[str, str], list[dict[str, float]]] = {}
    decisions: dict[str, dict[str, int]] = {}
    for r in range(args.repeats):
        for _, test_idx in (halves(y, groups, r), halves(y, groups, r)[::-1]):
            pick, rest = one_per_patient(y, groups, test_idx, 50, r)
            ys = y[test_idx]
            for cond in conditions:
                raw = s[f"raw:{cond}"][test_idx]
                cal = calibration.fit_calibration(ys[pick], raw[pick], "balanced")
                calls = {"as shipped": raw[rest] >= cut}
                for name, base in (("sample rule", None), ("anchored", cut)):
                    thr, dec = site.site_threshold(ys[pick], raw[pick], cal, FLOOR, "max_specificity", base)
                    calls[name] = cal.apply(raw[rest]) >= thr
                    if base is not None:
                        d = decisions.setdefault(cond, {})
                        d[dec["decision"]] = d.get(dec["decision"], 0) + 1
                for name, called in calls.items():
                    yr = ys[rest]
                    sens, spec = float(called[yr == 1].mean()), float((~called[yr == 0]).mean())
                    accuracy = float((called == (yr == 1)).mean())
                    draws.setdefault((cond, name), []).append(
                        {
                            "sensitivity": sens,
                            "specificity": spec,
                            "accuracy": accuracy,
                            "passes": float(accuracy >= 0.95 and sens >= 0.95),
                        }
                    )
    out: dict[str, Any] = {"decisions_anchored": decisions}
    for (cond, name), ms in draws.items():
        out.setdefault(cond, {})[name] = {
            k: [float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))] for k in ms[0]
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--store", type=Path, default=Path("model_store"))
    ap.add_argument("--version", default="v0002")
    ap.add_argument("--out", type=Path, default=Path("runs/schemes"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--site-demo", type=Path, help="only write the calibrate demonstration folders here")
    ap.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="MEMBER_OUT",
        help="a deep ensemble: score the mean logit of these earlier --out folders (no drift part)",
    )
    args = ap.parse_args()
    if args.site_demo:
        write_site_demo(args.data, args.site_demo)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        combine_members(args.combine, args.out)
    s = compute_scores(args, args.out)
    y, groups, age = s["labels"], s["groups"], s["age"]
    conditions = ["clean", *PROBES]
    results: dict[str, Any] = {"cross_fit": {}, "era": {}, "site": {}, "drift": {}}
    # cross-fitting over repeated patient halves
    acc: dict[tuple[str, str], list[dict[str, float]]] = {}
    site_acc: dict[str, list[dict[str, float]]] = {}
    for r in range(args.repeats):
        for fit_idx, test_idx in (halves(y, groups, r), halves(y, groups, r)[::-1]):
            for sname, scheme in SCHEMES.items():
                key = scheme["scores"]
                cal, thr = fit(scheme, y[fit_idx], s[f"{key}:clean"][fit_idx])
                for cond in conditions:
                    if key == "tta" and cond not in TTA_CONDITIONS:
                        continue  # no TTA scores for the aspect probes
                    m = measure(cal, thr, y[test_idx], s[f"{key}:{cond}"][test_idx])
                    acc.setdefault((sname, cond), []).append(m)
            # site recalibration on the shifted half: 60 + 60 patients fit, rest measured
            mask = site_subsample(y, groups, test_idx, 60, r)
            for cond in conditions:
                raw = s[f"raw:{cond}"][test_idx]
                cal, thr = fit(SCHEMES["b_balanced"], y[test_idx][mask], raw[mask])
                site_acc.setdefault(cond, []).append(measure(cal, thr, y[test_idx][~mask], raw[~mask]))
    results["site_small"] = small_site_study(args, s, y, groups, conditions)
    for (sname, cond), ms in acc.items():
        results["cross_fit"].setdefault(cond, {})[sname] = {
            k: [float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))] for k in ms[0]
        }
    for cond, ms in site_acc.items():
        results["site"][cond] = {
            k: [float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))] for k in ms[0]
        }
    # leave-era-out: newer half fits, older half measured (per class, by patient age rank)
    older = np.zeros(y.size, dtype=bool)
    for c in (0, 1):
        m = y == c
        older[m] = age[m] <= np.median(age[m])
    for sname, scheme in SCHEMES.items():
        key = scheme["scores"]
        cal, thr = fit(scheme, y[~older], s[f"{key}:clean"][~older])
        results["era"][sname] = {
            cond: measure(cal, thr, y[older], s[f"{key}:{cond}"][older])
            for cond in ("clean", "gamma_0.7", "contrast_0.7", "normal_only_aspect_0.79")
            if key == "raw" or cond in TTA_CONDITIONS
        }
    results["era"]["n"] = {"fit": int((~older).sum()), "measure": int(older.sum())}
    if args.combine:  # no stored version serves the ensemble: no calibration to serve, no drift reference
        (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(json.dumps(results["cross_fit"]["clean"], indent=1))
        return 0
    # drift monitor on streams built from validation scores (as the version serves them)
    meta = model_store.read_metadata(args.store, args.version)
    metrics = model_store.read_json(args.store, args.version, model_store.METRICS_FILE)
    ref = drift.reference_from_metadata(meta, metrics)
    served = {
        c: calibrate(s[f"raw:{c}"], float(meta["temperature"]), float(meta.get("logit_shift", 0.0)))
        for c in conditions
    }
    rng = np.random.default_rng(7)
    for cond in conditions:
        fired = 0
        checks = 0
        for _ in range(200):
            idx = rng.choice(y.size, size=500, replace=True)
            mon = drift.DriftMonitor(ref, window=500, every=500)
            rep = mon.update(served[cond][idx])
            checks += 1
            fired += rep is not None
        results["drift"][cond] = fired / checks
    for prev in (0.3, 0.5):
        fired = 0
        for _ in range(200):
            n_pos = rng.binomial(500, prev)
            idx = np.concatenate(
                [rng.choice(np.where(y == 1)[0], n_pos), rng.choice(np.where(y == 0)[0], 500 - n_pos)]
            )
            rep = drift.DriftMonitor(ref, window=500, every=500).update(served["clean"][idx])
            fired += rep is not None and "scores" in rep.reasons
        results["drift"][f"prevalence_{prev}_score_test"] = fired / 200
    results["reliability_clean_v0002"] = reliability_bins(y, served["clean"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps(results["cross_fit"]["clean"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
