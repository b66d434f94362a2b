"""Score drift: do the served probabilities still look like what the version saw on validation?

A version's *reference* (``validation_reference`` in metadata.json, written by training and by
``xray-watcher calibrate``) holds the histogram of its served probabilities on validation,
per class, over 10 fixed bins, plus the share it called PNEUMONIA there. ``DriftMonitor``
keeps a rolling window of served probabilities and, once the window holds ``min_files``
files and every ``every`` files after that, runs two tests:

- **Scores** (does not depend on the patient mix): the window's histogram is compared with
  the best mixture ``pi * PNEUMONIA + (1 - pi) * NORMAL`` of the reference histograms (``pi``
  fitted by maximum likelihood, reported as the estimated PNEUMONIA share). A Pearson
  chi-square statistic, with each bin's variance including the reference's own sampling
  noise and bins merged until each expects >= 5 files, df = bins - 2. A change of the
  images (device, export, population) moves scores *within* a class and fails this test;
  a change of the patient mix alone does not.
- **Share called PNEUMONIA**: an exact binomial test against the share expected at the
  reference's prevalence (or the ``prevalence`` given to the monitor),
  ``pi * sensitivity + (1 - pi) * (1 - specificity)``. It moves with the images *and* with
  the patient mix; skipped when the reference states no prevalence.

Each test uses ``alpha / 2`` (Bonferroni). A report names ``xray-watcher calibrate`` as the
remedy. For versions without a stored reference (v0001, v0002) ``reference_from_metadata``
rebuilds it from metrics.json's reliability bins (counts and observed PNEUMONIA rate per bin
give the per-class histograms) and confusion matrix; with neither, it returns ``None``: the
monitor is off, and callers should say so.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

N_BINS = 10
REMEDY = (
    "run 'xray-watcher calibrate --data DIR' with a labelled local sample (NORMAL/ and PNEUMONIA/, "
    "50-500 images, ideally >= 125 PNEUMONIA) to refit the calibration and threshold for this site"
)


def bin_index(probs: npt.ArrayLike, n_bins: int = N_BINS) -> npt.NDArray[np.int64]:
    """Equal-width bin of each probability (upper edges inclusive, as sklearn's calibration_curve)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out: npt.NDArray[np.int64] = np.searchsorted(edges[1:-1], np.asarray(probs, dtype=np.float64)).astype(
        np.int64
    )
    return out


def histogram(probs: npt.ArrayLike, n_bins: int = N_BINS) -> npt.NDArray[np.int64]:
    """Counts per equal-width bin."""
    return np.bincount(bin_index(probs, n_bins), minlength=n_bins).astype(np.int64)


def reference_from_scores(
    labels: npt.ArrayLike, probs: npt.ArrayLike, threshold: float, source: str = "validation"
) -> dict[str, Any]:
    """The reference a version stores: per-class histograms of served probabilities, share called."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    called = p >= threshold
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    return {
        "source": source,
        "bins": N_BINS,
        "normal_counts": histogram(p[y == 0]).tolist(),
        "pneumonia_counts": histogram(p[y == 1]).tolist(),
        "threshold": float(threshold),
        "n": int(y.size),
        "positive_share": float(called.mean()) if y.size else float("nan"),
        "prevalence": float(y.mean()) if y.size else None,
        "sensitivity": float(called[y == 1].mean()) if n_pos else float("nan"),
        "specificity": float((~called[y == 0]).mean()) if n_neg else float("nan"),
    }


def reference_from_metadata(
    metadata: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The version's validation reference; rebuilt from metrics.json when not stored; else None."""
    stored = metadata.get("validation_reference")
    if isinstance(stored, Mapping) and stored.get("normal_counts") and stored.get("pneumonia_counts"):
        return dict(stored)
    if not metrics:
        return None
    try:
        bins = metrics["reliability"]
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
        threshold = float(metadata.get("threshold", metrics["threshold"]))
        if len(bins) != N_BINS or abs(float(metrics["threshold"]) - threshold) > 1e-9:
            return None
        pos = [round(b["count"] * b["observed_rate"]) if b["count"] else 0 for b in bins]
        neg = [b["count"] - q for b, q in zip(bins, pos, strict=True)]
    except (KeyError, TypeError, ValueError):
        return None
    n_pos, n_neg = tp + fn, tn + fp
    if sum(pos) != n_pos or sum(neg) != n_neg or not n_pos or not n_neg:
        return None
    return {
        "source": "metrics.json reliability bins and confusion matrix",
        "bins": N_BINS,
        "normal_counts": neg,
        "pneumonia_counts": pos,
        "threshold": threshold,
        "n": n_pos + n_neg,
        "positive_share": (tp + fp) / (n_pos + n_neg),
        "prevalence": n_pos / (n_pos + n_neg),
        "sensitivity": tp / n_pos,
        "specificity": tn / n_neg,
    }


@dataclass(frozen=True)
class DriftReport:
    """One evaluation of the window; ``drift`` is True when either test rejects."""

    drift: bool
    n: int
    message: str
    reasons: list[str]
    positive_share: float
    expected_positive_share: float | None
    share_p_value: float | None
    score_p_value: float
    estimated_prevalence: float
    histogram: list[int]
    expected_histogram: list[float] = field(default_factory=list)

    def to_fields(self) -> dict[str, Any]:
        """Fields for a structlog event (e.g. ``log.warning("score_drift", **report.to_fields())``)."""
        return asdict(self)


def _merge_groups(expected: npt.NDArray[np.float64], minimum: float = 5.0) -> list[list[int]]:
    """Adjacent bins merged left to right until each group expects >= ``minimum``."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for b, e in enumerate(expected):
        current.append(b)
        total += float(e)
        if total >= minimum:
            groups.append(current)
            current, total = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


class DriftMonitor:
    """Rolling window of served probabilities, tested against a version's validation reference."""

    def __init__(
        self,
        reference: Mapping[str, Any],
        window: int = 500,
        alpha: float = 0.001,
        min_files: int = 100,
        every: int = 100,
        prevalence: float | None = None,
    ) -> None:
        neg = np.asarray(reference["normal_counts"], dtype=np.float64)
        pos = np.asarray(reference["pneumonia_counts"], dtype=np.float64)
        if neg.shape != (N_BINS,) or pos.shape != (N_BINS,) or neg.sum() <= 0 or pos.sum() <= 0:
            raise ValueError(f"reference needs {N_BINS}-bin non-empty normal_counts and pneumonia_counts")
        if min_files < 20 or window < min_files:
            raise ValueError(f"need 20 <= min_files ({min_files}) <= window ({window})")
        self.reference = dict(reference)
        self.window = window
        self.alpha = alpha
        self.min_files = min_files
        self.every = max(int(every), 1)
        self.n_neg, self.n_pos = float(neg.sum()), float(pos.sum())
        # class histograms, smoothed by half a count per bin so no bin has probability 0
        self.h0 = (neg + 0.5) / (self.n_neg + 0.5 * N_BINS)
        self.h1 = (pos + 0.5) / (self.n_pos + 0.5 * N_BINS)
        self.threshold = float(reference["threshold"])
        stated = prevalence if prevalence is not None else reference.get("prevalence")
        self.prevalence = float(stated) if stated is not None else None
        self._scores: deque[float] = deque(maxlen=window)
        self._since = 0
        # the tests' library, imported now (the daemon builds its monitor before it is ready)
        # rather than at the first check: there, importing scipy.stats took 1.3 s of CPU with
        # the GIL held, in the middle of a burst (2 cores, AMD EPYC Zen 3)
        import scipy.optimize  # type: ignore[import-untyped]
        import scipy.stats  # type: ignore[import-untyped]  # noqa: F401

    def __len__(self) -> int:
        return len(self._scores)

    def update(self, probabilities: Iterable[float]) -> DriftReport | None:
        """Add served probabilities; a report when a due check finds drift, else None."""
        for p in probabilities:
            self._scores.append(float(p))
            self._since += 1
        if len(self._scores) < self.min_files or self._since < self.every:
            return None
        self._since = 0
        report = self.check()
        return report if report.drift else None

    def _fit_prevalence(self, counts: npt.NDArray[np.float64]) -> float:
        from scipy.optimize import minimize_scalar

        def neg_log_lik(pi: float) -> float:
            return float(-np.sum(counts * np.log(pi * self.h1 + (1 - pi) * self.h0)))

        res = minimize_scalar(neg_log_lik, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-6})
        return float(res.x)

    def check(self) -> DriftReport:
        """Run both tests on the current window (whatever its size)."""
        from scipy.stats import binomtest, chi2

        scores = np.asarray(self._scores, dtype=np.float64)
        n = int(scores.size)
        counts = histogram(scores).astype(np.float64)
        pi = self._fit_prevalence(counts)
        mix = pi * self.h1 + (1 - pi) * self.h0
        expected = n * mix
        ref_var = n**2 * (
            pi**2 * self.h1 * (1 - self.h1) / self.n_pos
            + (1 - pi) ** 2 * self.h0 * (1 - self.h0) / self.n_neg
        )
        groups = _merge_groups(expected)
        stat = 0.0
        for g in groups:
            c, e = counts[g].sum(), expected[g].sum()
            v = e + float(np.sum(ref_var[g]))  # bins of a group treated as independent: conservative enough
            stat += (c - e) ** 2 / v
        df = max(len(groups) - 2, 1)
        score_p = float(chi2.sf(stat, df))
        k = int(np.sum(scores >= self.threshold))
        share = k / n if n else float("nan")
        expected_share: float | None = None
        share_p: float | None = None
        if self.prevalence is not None:
            sens = float(self.reference.get("sensitivity", float("nan")))
            spec = float(self.reference.get("specificity", float("nan")))
            if math.isfinite(sens) and math.isfinite(spec):
                share0 = self.prevalence * sens + (1 - self.prevalence) * (1 - spec)
                expected_share = min(max(share0, 1e-6), 1 - 1e-6)
                share_p = float(binomtest(k, n, expected_share).pvalue)
        reasons: list[str] = []
        level = self.alpha / 2
        if score_p < level:
            reasons.append("scores")
        if share_p is not None and share_p < level:
            reasons.append("positive_share")
        message = self._words(reasons, n, share, expected_share, pi, score_p, share_p)
        return DriftReport(
            drift=bool(reasons),
            n=n,
            message=message,
            reasons=reasons,
            positive_share=share,
            expected_positive_share=expected_share,
            share_p_value=share_p,
            score_p_value=score_p,
            estimated_prevalence=pi,
            histogram=[int(v) for v in counts],
            expected_histogram=[round(float(v), 2) for v in expected],
        )

    def _words(
        self,
        reasons: list[str],
        n: int,
        share: float,
        expected_share: float | None,
        pi: float,
        score_p: float,
        share_p: float | None,
    ) -> str:
        share_text = f"{share:.0%} of the last {n} files were called PNEUMONIA"
        if expected_share is not None:
            share_text += f" (expected {expected_share:.0%} at the validation patient mix)"
        if not reasons:
            return f"no drift: {share_text}; scores consistent with validation (p = {score_p:.3g})"
        parts = [share_text]
        if "scores" in reasons:
            parts.append(
                "the scores are not a mix of what this model version gave NORMAL and PNEUMONIA images "
                f"on validation (p = {score_p:.2g}): the images differ (device, export or patients), so "
                "the validated sensitivity and specificity may no longer hold"
            )
        else:
            parts.append(
                f"the scores look like validation's at a different patient mix (estimated {pi:.0%} "
                f"PNEUMONIA, p = {share_p:.2g} for the share): sensitivity and specificity do not "
                "depend on the mix, the probabilities do"
            )
        return "; ".join(parts) + "; " + REMEDY
