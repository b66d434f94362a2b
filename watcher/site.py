"""``xray-watcher calibrate``: refit calibration and threshold of a version on a local labelled sample.

::

    xray-watcher calibrate --data DIR [--store model_store] [--base VERSION]
                           [--min-sensitivity 0.97] [--promote]

``DIR`` holds ``NORMAL/`` and ``PNEUMONIA/`` with 50 to 500 images from the new site (at least
20 per class, or it refuses). The base version's ``model.keras`` is copied byte for byte; only
metadata.json changes: ``temperature`` and ``logit_shift`` (Platt scaling with class-balanced
weights, so probabilities hold for a stated prevalence of 0.5) and ``threshold`` (best
specificity with sensitivity >= the floor, ``watcher.calibration``). Images are decoded and
preprocessed exactly as the daemon does (``imaging.decode_bytes`` + ``preprocess`` with the
base's spec) and scored by the base's ``Predictor`` model.

The published figures are cross-validated on the sample (stratified k-fold, grouped by
patient when file names carry patient ids, else per file): calibration and threshold are
fitted on k-1 folds and measured on the held-out fold, and the held-out calls are pooled, so
they are not the optimistic in-sample figures; 95% intervals by bootstrap (patients). A
sample with few PNEUMONIA images cannot show a sensitivity of 0.97: the command says so,
with the exact (Wilson) lower bound the sample supports.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from watcher import __version__, calibration, drift, evaluation, model_store, onnxrt
from watcher.config import DEFAULT_CONFIG
from watcher.dicom import population_of
from watcher.errors import DecodeError, EvaluationError, WatcherError
from watcher.imaging import decode_bytes, preprocess
from watcher.splits import CLASS_NAMES, class_folder_problem, list_samples, patient_key

log = structlog.get_logger()

MIN_PER_CLASS = 20
RECOMMENDED_TOTAL = (50, 500)
DEFAULT_FOLDS = 5


def _score(predictor: Any, inputs: npt.NDArray[np.float32], batch: int = 32) -> npt.NDArray[np.float64]:
    """Raw model outputs (before calibration), batch by batch, through the daemon's Predictor."""
    raw_fn = getattr(predictor, "raw_probabilities", None)  # the serving graph, where Predictor has one
    if raw_fn is None:

        def raw_fn(x: npt.NDArray[np.float32]) -> Any:
            return predictor.model.predict_on_batch(x)

    out = [
        np.asarray(raw_fn(inputs[i : i + batch]), dtype=np.float64).reshape(-1)
        for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def _load(data: Path, predictor: Any) -> dict[str, Any]:
    """Decode + preprocess every image of the sample; unreadable files are skipped and listed."""
    problem = class_folder_problem(data)
    if problem:
        raise EvaluationError(problem)
    inputs, labels, groups, files, skipped = [], [], [], [], []
    seen: dict[str, tuple[int, str]] = {}  # sha256 -> (label, file) of its first copy

    def skip(path: Path, error: str) -> None:
        log.warning("calibrate_file_skipped", file=str(path), error=error)
        skipped.append({"file": str(path.relative_to(data)), "error": error})

    for s in list_samples(data):
        rel = s.path.relative_to(data).as_posix()
        try:
            raw = s.path.read_bytes()
        except OSError as exc:  # unreadable by this user, or gone: skipped like an undecodable file
            skip(s.path, f"cannot read: {exc.strerror or exc}")
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            label, first = seen[digest]
            if label != s.label:  # one image labelled both ways: the sample cannot be trusted
                raise EvaluationError(
                    f"the same image is both {CLASS_NAMES[label]} and {CLASS_NAMES[s.label]}: {first} and "
                    f"{rel} (sha256 {digest[:12]}); fix the sample's labels"
                )
            skip(s.path, f"a copy of {first}: counted once")  # a copy would leak across the folds
            continue
        seen[digest] = (s.label, rel)
        try:
            inputs.append(preprocess(decode_bytes(raw), predictor.spec))
        except DecodeError as exc:
            skip(s.path, str(exc))
            continue
        labels.append(s.label)
        key = patient_key(s.path.name)
        groups.append(f"{s.label}/{key.group}")
        files.append({"file": rel, "sha256": digest})
    return {
        "x": np.stack(inputs).astype(np.float32) if inputs else np.zeros((0, 1, 1, 1), np.float32),
        "y": np.asarray(labels, dtype=np.int64),
        "groups": groups,
        "files": files,
        "skipped": skipped,
    }


SHIFT_ALPHA = 0.01  # the cut is lowered only on this much evidence that the base misses too many


def base_raw_cut(threshold: float, temperature: float, logit_shift: float) -> float:
    """The model output at which a version's served probability equals its threshold."""
    z = temperature * float(calibration.logit(threshold)) - logit_shift
    return float(calibration.sigmoid(z))


def site_threshold(
    y: npt.NDArray[np.int64],
    raw: npt.NDArray[np.float64],
    cal: calibration.Calibration,
    min_sensitivity: float,
    rule: str,
    base_cut: float | None,
) -> tuple[float, dict[str, Any]]:
    """The threshold (in ``cal``'s probabilities) for a site sample, anchored on the base's cut.

    The base's cut was chosen on its whole validation set; a sample of 50-500 images holds far
    fewer PNEUMONIA images, and the plain rule (the best specificity with the sample's
    sensitivity >= the floor) then rests on its one or two lowest-scored PNEUMONIA images:
    two hard cases among 50 put the cut under the second of them, however low. So the cut
    moves from the base's (the same model output, under the new calibration) only where the
    sample gives reason:

    - *lowered* (to the plain rule's cut) when the PNEUMONIA images the base's cut misses are
      more than chance allows at the floor (one-sided binomial test at ``SHIFT_ALPHA``);
    - *raised* (better specificity) as far as the sample allows with the floor met in
      expectation: with ``n`` PNEUMONIA images, a cut just under the (m+1)-th lowest-scored
      one misses a share (m+1)/(n+1) of the site's on average, so m is the largest with
      (m+1)/(n+1) <= 1 - floor (none below 33 images at 0.97);
    - else *kept*.

    ``base_cut`` None: the plain rule. Returns the threshold and what was decided, for the
    version's metadata.
    """
    from scipy.stats import binom  # type: ignore[import-untyped]

    served = cal.apply(raw)
    plain = calibration.choose_threshold(y, served, min_sensitivity, rule=rule)
    if base_cut is None:
        return plain, {"decision": "sample rule", "threshold": plain}
    at_base = float(cal.apply(np.asarray([base_cut]))[0])
    pos = raw[y == 1]
    n = int(pos.size)
    misses = int(np.sum(pos < base_cut))
    p_value = float(binom.sf(misses - 1, n, 1.0 - min_sensitivity)) if n else 1.0
    decision = {
        "base_cut_model_output": base_cut,
        "threshold_at_base_cut": at_base,
        "pneumonia_images": n,
        "missed_at_base_cut": misses,
        "p_value_missed": p_value,
        "threshold_sample_rule": plain,
    }
    if plain < at_base and p_value < SHIFT_ALPHA:
        return plain, {**decision, "decision": "lowered"}
    allowed = int(np.floor((1.0 - min_sensitivity) * (n + 1) - 1 + 1e-9))
    if allowed >= 0:
        raised = calibration.choose_threshold(y, served, 1.0 - (allowed + 0.5) / n, rule=rule)
        if raised > at_base:
            return raised, {**decision, "decision": "raised", "misses_allowed": allowed}
    return at_base, {**decision, "decision": "kept"}


def _fit(
    y: npt.NDArray[np.int64],
    raw: npt.NDArray[np.float64],
    min_sensitivity: float,
    prior: str,
    rule: str,
    base_cut: float | None = None,
) -> tuple[calibration.Calibration, float, dict[str, Any]]:
    cal = calibration.fit_calibration(y, raw, prior)
    threshold, decision = site_threshold(y, raw, cal, min_sensitivity, rule, base_cut)
    return cal, threshold, decision


def cross_validate(
    y: npt.NDArray[np.int64],
    raw: npt.NDArray[np.float64],
    groups: list[str],
    min_sensitivity: float = 0.97,
    prior: str = calibration.DEFAULT_PRIOR,
    rule: str = calibration.DEFAULT_RULE,
    folds: int = DEFAULT_FOLDS,
    n_boot: int = 1000,
    seed: int = 0,
    base_cut: float | None = None,
) -> dict[str, Any]:
    """Out-of-fold calibrated probabilities and calls, pooled, with patient-bootstrap intervals.

    Each fold's calls come from the threshold fitted on the other folds; the pooled metrics
    (except ECE, taken on the pooled probabilities) are computed on the decision margin
    ``sigmoid(logit(p) - logit(threshold_fold))`` at 0.5, which reproduces each fold's calls.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    per_class_groups = min(len({g for g, lab in zip(groups, y, strict=True) if lab == c}) for c in (0, 1))
    k = max(2, min(folds, per_class_groups))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probs = np.zeros(y.size)
    margin = np.zeros(y.size)
    fold_fits = []
    for tr, te in cv.split(np.zeros(y.size), y, groups):
        cal, thr, decision = _fit(y[tr], raw[tr], min_sensitivity, prior, rule, base_cut)
        probs[te] = cal.apply(raw[te])
        margin[te] = calibration.sigmoid(calibration.logit(probs[te]) - calibration.logit(thr))
        fold_fits.append(
            {
                "threshold": thr,
                "temperature": cal.temperature,
                "logit_shift": cal.logit_shift,
                "decision": decision["decision"],
            }
        )
    metrics = evaluation.binary_metrics(y, margin, 0.5)
    ci = evaluation.bootstrap_ci(y, margin, 0.5, groups, n_boot=n_boot, seed=seed)
    metrics["ece"] = evaluation.expected_calibration_error(y, probs)
    ci["ece"] = evaluation.bootstrap_ci(y, probs, 0.5, groups, n_boot=n_boot, seed=seed)["ece"]
    return {
        "folds": k,
        "unit": "patient" if any(not g.split("/", 1)[1].startswith("file:") for g in groups) else "file",
        "metrics": metrics,
        "ci95": ci,
        "confusion_matrix": evaluation.confusion_matrix(y, margin, 0.5),
        "fold_fits": fold_fits,
        "probabilities": probs,
        "margin": margin,
    }


def power_warnings(n_pos: int, misses: int, min_sensitivity: float) -> tuple[float, list[str]]:
    """The Wilson 95% lower bound of sensitivity this sample supports, and warnings in words."""
    lower = calibration.sensitivity_lower_bound(n_pos, misses)
    needed = calibration.min_positives_for(min_sensitivity)
    warnings = []
    if lower < min_sensitivity:
        found = f"{n_pos - misses} of {n_pos} PNEUMONIA images found in cross-validation"
        if n_pos < needed:
            warnings.append(
                f"the sample is too small to show sensitivity >= {min_sensitivity:g}: {found}, 95% "
                f"lower bound {lower:.3f} (Wilson); one miss moves sensitivity by 1/{n_pos} = "
                f"{1 / n_pos:.3f}, and even with none missed at least {needed} PNEUMONIA images are "
                f"needed for a lower bound of {min_sensitivity:g}"
            )
        else:
            warnings.append(
                f"the sample does not show sensitivity >= {min_sensitivity:g}: {found} "
                f"({(n_pos - misses) / n_pos:.3f}), 95% lower bound {lower:.3f} (Wilson)"
            )
    return lower, warnings


def calibrate_site(
    data: Path,
    store: Path,
    base: str | None = None,
    min_sensitivity: float = 0.97,
    promote: bool = False,
    *,
    prior: str = calibration.DEFAULT_PRIOR,
    rule: str = calibration.DEFAULT_RULE,
    folds: int = DEFAULT_FOLDS,
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """Publish a copy of ``base`` recalibrated on the sample in ``data``; returns the new version."""
    from watcher.inference import serving_predictor

    data, store = Path(data), Path(store)
    if not 0.0 < min_sensitivity < 1.0:
        raise EvaluationError(f"--min-sensitivity must be in (0, 1), got {min_sensitivity}")
    base_version = base or model_store.current_version(store)
    # the base's raw outputs as the daemon serves them (its model.onnx: no TensorFlow here)
    predictor = serving_predictor(store, base_version)
    sample = _load(data, predictor)
    y = sample["y"]
    counts = {cls: int(np.sum(y == i)) for i, cls in enumerate(CLASS_NAMES)}
    short = {cls: n for cls, n in counts.items() if n < MIN_PER_CLASS}
    if short:
        raise EvaluationError(
            f"the sample in {data} has {', '.join(f'{n} {cls}' for cls, n in short.items())} readable "
            f"image(s); at least {MIN_PER_CLASS} per class are needed (50-500 in all recommended)"
        )
    warnings: list[str] = []
    total = int(y.size)
    if total < RECOMMENDED_TOTAL[0]:
        warnings.append(f"only {total} images: 50-500 are recommended")
    raw = _score(predictor, sample["x"])
    base_cut = base_raw_cut(predictor.threshold, predictor.temperature, predictor.logit_shift)
    cv = cross_validate(
        y, raw, sample["groups"], min_sensitivity, prior, rule, folds, n_boot, seed, base_cut=base_cut
    )
    (_, _), (fn, _) = cv["confusion_matrix"]
    lower, power = power_warnings(counts["PNEUMONIA"], fn, min_sensitivity)
    warnings.extend(power)
    cal, threshold, decision = _fit(y, raw, min_sensitivity, prior, rule, base_cut)
    served = cal.apply(raw)
    base_meta = predictor.metadata
    cal_dict = cal.to_dict()
    cal_dict["base_folded_logit_shift"] = (
        float(base_meta.get("calibration", {}).get("logit_shift", 0.0))
        if "logit_shift" not in base_meta
        else 0.0
    )
    cal_dict["fitted_on"] = f"the site sample ({total} images), raw outputs of {base_version}'s model"
    cv_report = {
        "method": f"stratified {cv['folds']}-fold cross-validation grouped by {cv['unit']}: calibration "
        "and threshold fitted on k-1 folds, calls on the held-out fold, pooled",
        "folds": cv["folds"],
        "unit": cv["unit"],
        "n_images": total,
        "n_normal": counts["NORMAL"],
        "n_pneumonia": counts["PNEUMONIA"],
        "n_patients": len(set(sample["groups"])),
        "metrics": cv["metrics"],
        "ci95": cv["ci95"],
        "bootstrap": {"n": n_boot, "unit": cv["unit"]},
        "confusion_matrix": {
            "rows_true": list(CLASS_NAMES),
            "cols_predicted": list(CLASS_NAMES),
            "matrix": cv["confusion_matrix"],
        },
        "sensitivity_lower_bound_95": lower,
        "ece_at_assumed_prevalence": evaluation.expected_calibration_error(
            y, cv["probabilities"], prevalence=cal.assumed_prevalence
        ),
        "fold_fits": cv["fold_fits"],
    }
    for name, val in cv["metrics"].items():
        log.info("calibrate_cv_metric", metric=name, value=round(val, 4), ci95=cv["ci95"].get(name))
    for text in warnings:
        log.warning("calibrate_sample_warning", warning=text)

    build = model_store.new_build_dir(store)
    try:
        shutil.copyfile(store / base_version / model_store.MODEL_FILE, build / model_store.MODEL_FILE)
        for name in (onnxrt.ONNX_FILE, onnxrt.ONNX_INFO):  # the same weights: the same graph
            if (store / base_version / name).is_file():
                shutil.copyfile(store / base_version / name, build / name)
        onnxrt.export_or_explain(build)  # checks the copied graph, or makes one
        rule_text = (
            f"{base_version}'s cut (the same model output), lowered to the "
            f"{'best specificity' if rule == 'max_specificity' else 'max Youden J'} with sensitivity "
            f">= {min_sensitivity:g} on the site sample where the sample's misses at that cut are more than "
            f"chance allows (binomial, p < {SHIFT_ALPHA:g}), raised where the sample's PNEUMONIA images "
            f"allow with the floor met in expectation; midpoint to the next lower score"
        )
        metrics = {
            "threshold": threshold,
            "n_images": total,
            "n_normal": counts["NORMAL"],
            "n_pneumonia": counts["PNEUMONIA"],
            "n_patients": cv_report["n_patients"],
            "metrics": cv["metrics"],
            "ci95": cv["ci95"],
            "bootstrap": cv_report["bootstrap"],
            "confusion_matrix": cv_report["confusion_matrix"],
            "reliability": evaluation.reliability_bins(y, cv["probabilities"]),
            "in_sample": evaluation.binary_metrics(y, served, threshold),
            "cross_validation": cv_report,
            "calibration": cal_dict,
            "temperature": cal.temperature,
            "logit_shift": cal.logit_shift,
            "threshold_rule": rule_text,
            "threshold_decision": decision,
            "warnings": warnings,
            "skipped": sample["skipped"],
        }
        evaluation.write_plots(build, y, cv["margin"], 0.5)
        evaluation.plot_reliability(y, cv["probabilities"], build / evaluation.PLOT_FILES[3])
        (build / model_store.METRICS_FILE).write_text(model_store.json_text(metrics) + "\n", encoding="utf-8")
        keep = ("class_names", "preprocessing", "architecture", "architecture_description", "input_shape")
        metadata: dict[str, Any] = {k: base_meta[k] for k in keep if k in base_meta}
        metadata.update(
            {
                "version": None,
                "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "base_version": base_version,
                "threshold": threshold,
                "temperature": cal.temperature,
                "logit_shift": cal.logit_shift,
                "calibration": cal_dict,
                "intended_population": population_of(base_meta),
                "trainer_version": __version__,
                "site_calibration": {
                    "data": str(data.resolve()),
                    "images": counts,
                    "files": sample["files"],
                    "skipped_files": sample["skipped"],
                    "min_sensitivity": min_sensitivity,
                    "threshold_rule": rule_text,
                    "threshold_decision": decision,
                    "warnings": warnings,
                },
                "validation": {
                    "split": "site cross-validation",
                    "threshold_rule": rule_text,
                    **cv["metrics"],
                    "ci95": cv["ci95"],
                    "n_images": total,
                    "n_patients": cv_report["n_patients"],
                    "sensitivity_lower_bound_95": lower,
                },
                "validation_reference": {
                    **drift.reference_from_scores(y, served, threshold, source="site sample"),
                    "prevalence": None,  # the sample's mix is a choice, not the site's: share test off
                },
                "weights": {"copied_from": base_version, "training": base_meta.get("training")},
            }
        )
        for key in ("parameters", "library_versions"):
            if key in base_meta:
                metadata[key] = base_meta[key]

        version = model_store.publish_with_metadata(store, build, metadata)
    except BaseException:
        model_store.remove_build(build)
        raise
    log.info(
        "calibrate_published",
        version=version,
        base=base_version,
        threshold=round(threshold, 4),
        threshold_decision=decision["decision"],
        temperature=round(cal.temperature, 4),
        logit_shift=round(cal.logit_shift, 4),
        images=counts,
    )
    if promote:
        model_store.set_current(
            store, version, reason=f"calibrate --promote (site calibration of {base_version})"
        )
    return version


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``xray-watcher calibrate``."""
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="labelled local sample: NORMAL/ and PNEUMONIA/ (50-500 images)",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="config file, for its model_store (default: %(default)s)"
    )
    parser.add_argument("--store", type=Path, help="model store (default: the config's model_store)")
    parser.add_argument("--base", help="version to recalibrate (default: current)")
    parser.add_argument(
        "--min-sensitivity",
        type=float,
        default=0.97,
        help="sensitivity floor of the threshold (default: %(default)s)",
    )
    parser.add_argument("--promote", action="store_true", help="make the new version current")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``calibrate``; prints the new version and the cross-validated figures; 0 or 1."""
    try:
        version = calibrate_site(args.data, args.store, args.base, args.min_sensitivity, args.promote)
    except WatcherError as exc:
        print(f"xray-watcher calibrate: error: {exc}", file=sys.stderr)
        return 1
    meta = model_store.read_metadata(Path(args.store), version)
    val = meta["validation"]
    ci = val["ci95"]
    print(version)
    print(
        f"base {meta['base_version']}, threshold {meta['threshold']:.4f}, "
        f"temperature {meta['temperature']:.3f}, logit shift {meta['logit_shift']:+.3f} "
        f"(probabilities for prevalence "
        f"{meta['calibration']['assumed_prevalence']:g})",
        file=sys.stderr,
    )

    def fmt(value: Any) -> str:  # an undefined figure is stored as null
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    decision = meta["site_calibration"].get("threshold_decision") or {}
    if "missed_at_base_cut" in decision:
        print(
            f"threshold {decision['decision']}: at {meta['base_version']}'s cut, "
            f"{decision['missed_at_base_cut']} of the sample's {decision['pneumonia_images']} "
            "PNEUMONIA images missed "
            f"(p = {decision['p_value_missed']:.3g} at the floor; lowered only below {SHIFT_ALPHA:g})",
            file=sys.stderr,
        )
    for name in ("sensitivity", "specificity", "roc_auc", "ece"):
        low, high = ci[name]
        print(
            f"  {name:<12} {fmt(val[name])} (95% CI {fmt(low)}-{fmt(high)}), cross-validated", file=sys.stderr
        )
    for text in meta["site_calibration"]["warnings"]:
        print(f"warning: {text}", file=sys.stderr)
    return 0
