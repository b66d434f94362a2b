"""Evaluation: metrics, patient-level bootstrap intervals, reliability bins, plots, reports.

The numbers come from scikit-learn (``roc_curve``, ``roc_auc_score``, ``confusion_matrix``,
``calibration_curve``); what no library does is ours: the bootstrap over *patients*, the
count-weighted ECE over fixed bins and the report layout. PNEUMONIA is the positive class; a
score ``>= threshold`` is positive.

Calibration (Platt scaling, temperature, prevalence) and the threshold rules live in
``watcher.calibration``; ``fit_platt``, ``fit_temperature``, ``apply_temperature``, ``nll`` and
``choose_threshold`` are re-exported here for existing callers. ``choose_threshold`` here keeps
the v0001/v0002 rule: among cut points whose validation sensitivity is at least
``min_sensitivity`` (0.97), the largest Youden J, placed halfway to the next lower score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from watcher import calibration
from watcher.errors import DecodeError, EvaluationError
from watcher.imaging import decode_image, preprocess

if TYPE_CHECKING:
    from watcher.inference import Predictor

log = structlog.get_logger()

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "ece")


def _arrays(y_true: Sequence[int] | npt.ArrayLike, scores: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    return calibration.check_labels_scores(y_true, scores)


def _div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


# ------------------------------------------------------------------ metrics


def confusion_matrix(y_true: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows are the true class (NORMAL, PNEUMONIA), columns the call."""
    from sklearn import metrics

    y, s = _arrays(y_true, scores)
    matrix = metrics.confusion_matrix(y, (s >= threshold).astype(np.int64), labels=[0, 1])
    return [[int(v) for v in row] for row in matrix]


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN for one class."""
    from sklearn import metrics

    y, s = _arrays(y_true, scores)
    if y.size == 0 or len(np.unique(y)) < 2:
        return float("nan")
    return float(metrics.roc_auc_score(y, s))


def roc_curve(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(fpr, tpr, thresholds), thresholds decreasing; the first point is (0, 0) at +inf.

    ``sklearn.metrics.roc_curve`` with one point per distinct score (no points dropped).
    """
    from sklearn import metrics

    y, s = _arrays(y_true, scores)
    fpr, tpr, thr = metrics.roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thr.astype(np.float64)


def _bin_index(p: FloatArray, n_bins: int) -> IntArray:
    """Equal-width bin of each probability, as ``sklearn.calibration.calibration_curve`` bins them."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out: IntArray = np.searchsorted(edges[1:-1], p).astype(np.int64)
    return out


def reliability_bins(y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin: count, mean probability, observed PNEUMONIA rate.

    Rates and means of the non-empty bins from ``sklearn.calibration.calibration_curve``.
    """
    y, p = _arrays(y_true, probs)
    counts = np.bincount(_bin_index(p, n_bins), minlength=n_bins) if y.size else np.zeros(n_bins, int)
    observed = np.full(n_bins, np.nan)
    mean_p = np.full(n_bins, np.nan)
    if y.size:
        from sklearn.calibration import calibration_curve

        rate, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        filled = np.nonzero(counts)[0]
        observed[filled], mean_p[filled] = rate, mean
    return [
        {
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": int(counts[b]),
            "mean_probability": float(mean_p[b]),
            "observed_rate": float(observed[b]),
        }
        for b in range(n_bins)
    ]


def expected_calibration_error(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10, prevalence: float | None = None
) -> float:
    """ECE: count-weighted mean |observed PNEUMONIA rate - mean probability| over equal-width bins.

    With ``prevalence``, images are weighted so that the classes mix at that prevalence (what
    the ECE would be on a sample with that PNEUMONIA share): use it for probabilities
    calibrated for a stated prevalence (``calibration.assumed_prevalence``).
    """
    y, p = _arrays(y_true, probs)
    if y.size == 0:
        return float("nan")
    if prevalence is None:
        bins = reliability_bins(y, p, n_bins)
        total = sum(b["count"] * abs(b["observed_rate"] - b["mean_probability"]) for b in bins if b["count"])
        return float(total / y.size)
    n_pos = max(int(y.sum()), 1)
    w = np.where(y == 1, prevalence / n_pos, (1 - prevalence) / max(y.size - n_pos, 1))
    idx = _bin_index(p, n_bins)
    err = 0.0
    for b in np.unique(idx):
        m = idx == b
        err += float(w[m].sum()) * abs(float(np.average(y[m], weights=w[m]) - np.average(p[m], weights=w[m])))
    return float(err / w.sum())


def binary_metrics(y_true: npt.ArrayLike, probs: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision, F1, ROC AUC and ECE at ``threshold``."""
    y, p = _arrays(y_true, probs)
    (tn, fp), (fn, tp) = confusion_matrix(y, p, threshold)
    sens = _div(tp, tp + fn)
    prec = _div(tp, tp + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _div(tp + tn, y.size),
        "sensitivity": sens,
        "specificity": _div(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "roc_auc": roc_auc(y, p),
        "ece": float(expected_calibration_error(y, p)),
    }


def bootstrap_ci(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of ``binary_metrics``.

    With ``groups`` (patient ids) whole patients are resampled, since images of one
    patient are not independent; otherwise single images.
    """
    y, p = _arrays(y_true, probs)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(y.size)]
    else:
        if len(groups) != y.size:
            raise ValueError("groups must have one entry per score")
        index: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            index.setdefault(g, []).append(i)
        members = [np.array(v) for v in index.values()]
    if not members:
        return {k: [float("nan"), float("nan")] for k in METRIC_NAMES}
    samples: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[j] for j in pick])
        m = binary_metrics(y[idx], p[idx], threshold)
        for k in METRIC_NAMES:
            samples[k].append(m[k])
    alpha = (1.0 - level) / 2.0
    out = {}
    for k, vals in samples.items():
        arr = np.array(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[k] = (
            [float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))]
            if arr.size
            else [float("nan"), float("nan")]
        )
    return out


# ------------------------------------------------------- calibration, threshold

apply_temperature = calibration.apply_temperature
nll = calibration.nll
fit_temperature = calibration.fit_temperature
fit_platt = calibration.fit_platt


def choose_threshold(y_true: npt.ArrayLike, probs: npt.ArrayLike, min_sensitivity: float = 0.97) -> float:
    """Max Youden J subject to sensitivity >= ``min_sensitivity`` (the v0001/v0002 rule)."""
    return calibration.choose_threshold(y_true, probs, min_sensitivity, rule="youden_floor")


def full_report(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics at ``threshold`` with bootstrap 95% CIs, confusion matrix, counts, reliability bins."""
    y, p = _arrays(y_true, probs)
    metrics = binary_metrics(y, p, threshold)
    return {
        "threshold": float(threshold),
        "n_images": int(y.size),
        "n_normal": int(np.sum(y == 0)),
        "n_pneumonia": int(np.sum(y == 1)),
        "n_patients": len(set(groups)) if groups is not None else None,
        "metrics": metrics,
        "ci95": bootstrap_ci(y, p, threshold, groups, n_boot=n_boot, seed=seed),
        "bootstrap": {"n": n_boot, "unit": "patient" if groups is not None else "image"},
        "at_0.5": binary_metrics(y, p, 0.5),
        "confusion_matrix": {
            "rows_true": list(CLASS_NAMES),
            "cols_predicted": list(CLASS_NAMES),
            "matrix": confusion_matrix(y, p, threshold),
        },
        "reliability": reliability_bins(y, p),
    }


# -------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Mapping[str, Sequence[float]], path: Path) -> None:
    """Loss and AUC per epoch, train and validation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "auc"), strict=True):
        plotted = False
        for prefix, style in (("", "-"), ("val_", "--")):
            vals = history.get(prefix + key)
            if vals:
                ax.plot(range(1, len(vals) + 1), vals, style, label=(prefix or "train_") + key)
                plotted = True
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_roc(y_true: npt.ArrayLike, probs: npt.ArrayLike, threshold: float, path: Path) -> None:
    """ROC curve with the operating point marked."""
    plt = _pyplot()
    fpr, tpr, _ = roc_curve(y_true, probs)
    m = binary_metrics(y_true, probs, threshold)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {m['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.plot([1 - m["specificity"]], [m["sensitivity"]], "o", color="red", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (PNEUMONIA positive)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], path: Path) -> None:
    """Confusion matrix heat map with counts."""
    plt = _pyplot()
    arr = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(arr, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(arr[i, j]),
                ha="center",
                va="center",
                color="white" if arr[i, j] > arr.max() / 2 else "black",
                fontsize=14,
            )
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reliability(y_true: npt.ArrayLike, probs: npt.ArrayLike, path: Path) -> None:
    """Reliability diagram: observed PNEUMONIA rate against mean probability per bin."""
    plt = _pyplot()
    bins = reliability_bins(y_true, probs)
    ece = expected_calibration_error(y_true, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    xs = [b["mean_probability"] for b in bins if b["count"]]
    ys = [b["observed_rate"] for b in bins if b["count"]]
    ax.plot(xs, ys, "o-", label=f"ECE {ece:.3f}")
    ax.bar(
        [b["lo"] + 0.05 for b in bins],
        [b["count"] / max(len(np.asarray(probs)), 1) for b in bins],
        width=0.1,
        alpha=0.2,
        color="grey",
        label="share of images",
    )
    ax.set_xlabel("predicted probability of PNEUMONIA")
    ax.set_ylabel("observed PNEUMONIA rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


PLOT_FILES = ("training_curves.png", "roc.png", "confusion_matrix.png", "reliability.png")


def write_plots(
    report_dir: Path,
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float,
    history: Mapping[str, Sequence[float]] | None = None,
) -> list[str]:
    """ROC, confusion matrix, reliability diagram (and training curves with a history)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if history is not None:
        plot_training_curves(history, report_dir / PLOT_FILES[0])
        written.append(PLOT_FILES[0])
    plot_roc(y_true, probs, threshold, report_dir / PLOT_FILES[1])
    plot_confusion(confusion_matrix(y_true, probs, threshold), report_dir / PLOT_FILES[2])
    plot_reliability(y_true, probs, report_dir / PLOT_FILES[3])
    written.extend(PLOT_FILES[1:])
    return written


# ------------------------------------------------------------ folder evaluation


def evaluate_folder(
    predictor: Predictor,
    data_dir: Path,
    report_dir: Path | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Score every image under ``data_dir/NORMAL`` and ``data_dir/PNEUMONIA`` with ``predictor``.

    Unreadable files are logged, counted and skipped (listed under ``skipped``). With
    ``report_dir``, ``metrics.json`` and the plots are written there.
    """
    from watcher.model_store import json_text
    from watcher.splits import class_folder_problem, list_samples, patient_id

    data_dir = Path(data_dir)
    problem = class_folder_problem(data_dir)
    if problem:
        raise EvaluationError(problem)
    samples = list_samples(data_dir)
    if not samples:
        raise EvaluationError(f"no images (.jpeg/.jpg/.png/.dcm) under {data_dir}/NORMAL or /PNEUMONIA")
    spec = predictor.spec

    def load(path: Path) -> npt.NDArray[np.float32] | str:
        try:
            return preprocess(decode_image(path), spec)
        except DecodeError as exc:
            return str(exc)

    labels: list[int] = []
    probs: list[float] = []
    groups: list[str] = []
    skipped: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            loaded = list(pool.map(load, [s.path for s in chunk]))
            good = [(s, x) for s, x in zip(chunk, loaded, strict=True) if not isinstance(x, str)]
            for s, x in zip(chunk, loaded, strict=True):
                if isinstance(x, str):
                    log.warning("evaluate_file_skipped", file=str(s.path), error=x)
                    skipped.append({"file": str(s.path.relative_to(data_dir)), "error": x})
            if not good:
                continue
            batch = np.stack([x for _, x in good]).astype(np.float32)
            probs.extend(float(v) for v in predictor.probabilities(batch))
            labels.extend(s.label for s, _ in good)
            groups.extend(f"{s.label}/{patient_id(s.path.name)}" for s, _ in good)
    if not labels:
        raise EvaluationError(f"none of the {len(samples)} images under {data_dir} could be decoded")
    report = full_report(labels, probs, predictor.threshold, groups, n_boot=n_boot)
    report.update(
        {
            "data": str(data_dir),
            "model_version": predictor.version,
            "temperature": predictor.temperature,
            "n_skipped": len(skipped),
            "skipped": skipped,
        }
    )
    if report_dir is not None:
        report_dir = Path(report_dir)
        write_plots(report_dir, labels, probs, predictor.threshold)
        (report_dir / "metrics.json").write_text(json_text(report) + "\n", encoding="utf-8")
    return report


def format_report(metrics: Mapping[str, Any]) -> str:
    """Human-readable text of a ``full_report`` / ``evaluate_folder`` result."""
    lines = []
    head = []
    if metrics.get("model_version"):
        head.append(f"model {metrics['model_version']}")
    if metrics.get("data"):
        head.append(f"data {metrics['data']}")
    if head:
        lines.append(", ".join(head))
    lines.append(
        f"images: {metrics['n_images']} ({metrics['n_normal']} NORMAL, "
        f"{metrics['n_pneumonia']} PNEUMONIA)"
        + (f", {metrics['n_skipped']} skipped (unreadable)" if metrics.get("n_skipped") else "")
        + (f", {metrics['n_patients']} patients" if metrics.get("n_patients") else "")
    )
    lines.append(f"threshold: {metrics['threshold']:.4f}")
    ci = metrics.get("ci95", {})
    for name in METRIC_NAMES:
        val = metrics["metrics"][name]
        lo_hi = ci.get(name)
        ci_text = f"  (95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else ""
        lines.append(f"  {name:<12} {val:.3f}{ci_text}")
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    width = max(len(str(v)) for v in (tn, fp, fn, tp)) + 2
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(f"  {'':<10}{'NORMAL':>{max(width, 7)}} {'PNEUMONIA':>{max(width, 10)}}")
    lines.append(f"  {'NORMAL':<10}{tn:>{max(width, 7)}} {fp:>{max(width, 10)}}")
    lines.append(f"  {'PNEUMONIA':<10}{fn:>{max(width, 7)}} {tp:>{max(width, 10)}}")
    for item in metrics.get("skipped", [])[:20]:
        lines.append(f"skipped {item['file']}: {item['error']}")
    return "\n".join(lines)
