"""Evaluation: metrics, bootstrap intervals, calibration, threshold choice, plots, reports.

Metrics are pure numpy. PNEUMONIA is the positive class; a score ``>= threshold`` is positive.

Threshold rule (``choose_threshold``): among cut points whose sensitivity on validation is at
least ``min_sensitivity`` (0.97), take the one with the largest Youden J = sensitivity +
specificity - 1, and place the threshold halfway between that score and the next lower one.
Why: the requirement (issue 3) is sensitivity >= 0.97 with specificity >= 0.90, and a missed
pneumonia costs more than a false alarm, hence the floor at the required sensitivity; above
it, Youden J weighs both classes equally, so it does not depend on the class mix, which
differs between our training folder (74% PNEUMONIA) and the clinic's test data (62.5%); and
because the known failure mode under distribution shift is NORMAL called PNEUMONIA, the
threshold is not pushed lower than the floor requires. (A floor of 0.95 was tried first: on
the era split it put the dsnet threshold at 0.84 with sensitivity 0.950, below the requirement.)

Calibration: ``fit_platt`` (used by training) fits ``sigmoid(a * logit(p) + c)``; the shift
is folded into the model and ``1 / a`` served as the temperature. ``fit_temperature`` finds
T > 0 minimising the negative log-likelihood of ``sigmoid(logit(p) / T)`` on validation (a
1-D golden-section search over log T), the transform ``watcher.inference.calibrate`` applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from watcher.errors import DecodeError, EvaluationError
from watcher.imaging import decode_image, preprocess

if TYPE_CHECKING:
    from watcher.inference import Predictor

log = structlog.get_logger()

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "ece")
_EPS = 1e-7


def _arrays(y_true: Sequence[int] | npt.ArrayLike, scores: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return y, s


def _div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


# ------------------------------------------------------------------ metrics


def confusion_matrix(y_true: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows are the true class (NORMAL, PNEUMONIA), columns the call."""
    y, s = _arrays(y_true, scores)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    return [[tn, fp], [fn, tp]]


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN for one class."""
    y, s = _arrays(y_true, scores)
    n_pos = int(np.sum(y == 1))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # mid-ranks for ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    u = float(np.sum(ranks[y == 1])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(fpr, tpr, thresholds), thresholds decreasing; the first point is (0, 0) at +inf."""
    y, s = _arrays(y_true, scores)
    thr = np.unique(s)[::-1]
    n_pos = max(int(np.sum(y == 1)), 1)
    n_neg = max(int(np.sum(y == 0)), 1)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    tp_cum = np.cumsum(ys == 1)
    fp_cum = np.cumsum(ys == 0)
    # last index of each distinct score in descending order
    last = np.searchsorted(-ss, -thr, side="right") - 1
    tpr = np.concatenate([[0.0], tp_cum[last] / n_pos])
    fpr = np.concatenate([[0.0], fp_cum[last] / n_neg])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def expected_calibration_error(y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed PNEUMONIA rate - mean probability| over equal-width bins."""
    y, p = _arrays(y_true, probs)
    if y.size == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.sum() * abs(float(y[mask].mean()) - float(p[mask].mean()))
    return total / y.size


def reliability_bins(y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin: count, mean probability, observed PNEUMONIA rate."""
    y, p = _arrays(y_true, probs)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = bins == b
        n = int(mask.sum())
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": n,
                "mean_probability": float(p[mask].mean()) if n else float("nan"),
                "observed_rate": float(y[mask].mean()) if n else float("nan"),
            }
        )
    return out


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


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, _EPS, 1 - _EPS)
    out: FloatArray = np.log(q) - np.log1p(-q)
    return out


def apply_temperature(probs: npt.ArrayLike, temperature: float) -> FloatArray:
    """sigmoid(logit(p) / T), as ``watcher.inference.calibrate`` does."""
    z = _logit(np.asarray(probs, dtype=np.float64)) / temperature
    out: FloatArray = 1.0 / (1.0 + np.exp(-z))
    return out


def nll(y_true: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """Mean binary negative log-likelihood."""
    y, p = _arrays(y_true, probs)
    q = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def fit_temperature(
    y_true: npt.ArrayLike, raw_probs: npt.ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature minimising validation NLL (golden-section search over log T)."""
    y, p = _arrays(y_true, raw_probs)
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0
    z = _logit(p)

    def loss(log_t: float) -> float:
        q = 1.0 / (1.0 + np.exp(-z / math.exp(log_t)))
        return nll(y, q)

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(math.exp((a + b) / 2))


def fit_platt(y_true: npt.ArrayLike, raw_probs: npt.ArrayLike, iterations: int = 100) -> tuple[float, float]:
    """Platt scaling ``sigmoid(a * logit(p) + c)`` fitted by Newton's method; returns (a, c).

    Written for serving as a temperature ``T = 1 / a`` plus a shift ``c / a`` of the model's
    output logit (folded into the output layer's bias): ``sigmoid((logit + c / a) / T)``.
    The shift undoes the prior change that balanced class weights bring, which a temperature
    alone cannot. Falls back to (1, 0) when there is a single class.
    """
    y, p = _arrays(y_true, raw_probs)
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0, 0.0
    z = _logit(p)
    feats = np.stack([z, np.ones_like(z)], axis=1)

    def loss(v: FloatArray) -> float:
        u = feats @ v
        return float(np.mean(np.logaddexp(0.0, u) - y * u))

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-(feats @ w)))
        grad = feats.T @ (q - y) / y.size
        hess = (feats * (q * (1 - q))[:, None]).T @ feats / y.size + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:  # backtracking: Newton from a saturated start overshoots
            trial = w - scale * step
            trial_loss = loss(trial)
            if trial_loss <= current:
                break
            scale /= 2
        else:
            break
        converged = current - trial_loss < 1e-12
        w, current = trial, trial_loss
        if converged:
            break
    return float(w[0]), float(w[1])


def choose_threshold(y_true: npt.ArrayLike, probs: npt.ArrayLike, min_sensitivity: float = 0.97) -> float:
    """Max Youden J subject to sensitivity >= ``min_sensitivity`` (see module docstring)."""
    y, p = _arrays(y_true, probs)
    if y.size == 0 or len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point
    j = tpr - fpr
    ok = tpr >= min_sensitivity - 1e-12
    if not ok.any():  # cannot reach the floor: highest sensitivity, i.e. the lowest cut
        ok = tpr >= tpr.max() - 1e-12
    cand = np.where(ok)[0]
    best = cand[np.argmax(j[cand])]
    cut = float(thr[best])
    lower = float(thr[best + 1]) if best + 1 < thr.size else max(cut - 0.02, 0.0)
    value = (cut + lower) / 2.0
    return float(min(max(value, 1e-4), 1 - 1e-4))


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
    import json

    from watcher.splits import list_samples, patient_id

    data_dir = Path(data_dir)
    missing = [c for c in CLASS_NAMES if not (data_dir / c).is_dir()]
    if missing:
        raise EvaluationError(
            f"{data_dir} must hold NORMAL/ and PNEUMONIA/ subfolders; missing: {', '.join(missing)}"
        )
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
        (report_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
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
