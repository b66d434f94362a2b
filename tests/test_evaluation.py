"""Metrics, calibration and threshold choice on synthetic scores with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from watcher import evaluation as ev


class TestMetrics:
    def test_confusion_and_rates(self) -> None:
        """A hand-counted example: 3 TP, 1 FN, 2 TN, 1 FP."""
        y = [1, 1, 1, 1, 0, 0, 0]
        p = [0.9, 0.8, 0.6, 0.2, 0.1, 0.3, 0.7]
        assert ev.confusion_matrix(y, p, 0.5) == [[2, 1], [1, 3]]
        m = ev.binary_metrics(y, p, 0.5)
        assert pytest.approx(5 / 7) == m["accuracy"]
        assert pytest.approx(3 / 4) == m["sensitivity"]
        assert pytest.approx(2 / 3) == m["specificity"]
        assert pytest.approx(3 / 4) == m["precision"]
        assert pytest.approx(3 / 4) == m["f1"]

    def test_auc_known_values(self) -> None:
        """AUC is 1 when separated, 0 when reversed, 0.5 with all ties, and counts ties as half."""
        assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
        assert ev.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
        assert ev.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
        # one positive ties one negative, beats the other: (1 + 0.5) / 2
        assert ev.roc_auc([0, 0, 1], [0.2, 0.5, 0.5]) == 0.75
        assert math.isnan(ev.roc_auc([1, 1], [0.2, 0.5]))

    def test_auc_matches_roc_curve_area(self) -> None:
        """The rank AUC equals the trapezoid area under ``roc_curve`` on random scores."""
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 300)
        s = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounded: many ties
        fpr, tpr, _ = ev.roc_curve(y, s)
        area = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
        assert pytest.approx(area, abs=1e-12) == ev.roc_auc(y, s)
        assert (fpr[-1], tpr[-1]) == (1.0, 1.0)

    def test_agrees_with_sklearn(self) -> None:
        """AUC and confusion matrix are scikit-learn's; one class gives NaN AUC, not a warning."""
        from sklearn.metrics import confusion_matrix, roc_auc_score

        rng = np.random.default_rng(5)
        y = rng.integers(0, 2, 500)
        s = rng.normal(y, 1.0)
        assert roc_auc_score(y, s) == ev.roc_auc(y, s)
        assert confusion_matrix(y, s >= 0.5).tolist() == ev.confusion_matrix(y, s, 0.5)
        assert math.isnan(ev.roc_auc([0, 0], [0.1, 0.2]))
        assert [[2, 0], [0, 0]] == ev.confusion_matrix([0, 0], [0.1, 0.2], 0.5)

    def test_reliability_bins_count_everything(self) -> None:
        """Every score lands in one of the 10 bins, 0 and 1 included; empty bins are NaN."""
        p = [0.0, 0.05, 0.1, 0.55, 1.0]
        bins = ev.reliability_bins([0, 0, 1, 1, 1], p)
        assert 5 == sum(b["count"] for b in bins)
        assert 1.0 == bins[-1]["observed_rate"]
        assert math.isnan(bins[3]["mean_probability"])

    def test_ece_known(self) -> None:
        """Perfectly calibrated bins give ECE 0; always saying 0.9 for a 50% class gives 0.4."""
        y = np.array([1] * 3 + [0] * 7 + [1] * 7 + [0] * 3)
        p = np.array([0.3] * 10 + [0.7] * 10)
        assert pytest.approx(0.0, abs=1e-12) == ev.expected_calibration_error(y, p)
        assert pytest.approx(0.4) == ev.expected_calibration_error([0, 1] * 50, [0.9] * 100)

    def test_ece_at_a_prevalence(self) -> None:
        """Probabilities right for a 50% mix: ECE 0 when re-weighted to 0.5, not on a 80% sample."""
        y = np.array([1] * 8 + [0] * 8 + [1] * 2 + [0] * 32)  # 10 PNEUMONIA, 40 NORMAL
        p = np.array([0.8] * 16 + [0.2] * 34)  # re-weighted to 50/50 the bins' rates are 0.8 and 0.2
        assert pytest.approx(0.0, abs=1e-12) == ev.expected_calibration_error(y, p, prevalence=0.5)
        assert ev.expected_calibration_error(y, p) > 0.1

    def test_bootstrap_ci_contains_estimate(self) -> None:
        """The 95% intervals bracket the point estimate, and patient resampling works."""
        rng = np.random.default_rng(1)
        y = rng.integers(0, 2, 200)
        p = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 200), 0, 1)
        groups = [f"g{i // 2}" for i in range(200)]
        m = ev.binary_metrics(y, p, 0.5)
        ci = ev.bootstrap_ci(y, p, 0.5, groups, n_boot=200, seed=0)
        for k in ("accuracy", "roc_auc", "sensitivity"):
            assert ci[k][0] <= m[k] <= ci[k][1]
            assert ci[k][1] - ci[k][0] < 0.3


class TestCalibration:
    def test_recovers_known_temperature(self) -> None:
        """Scores drawn as sigmoid(z * 3) from a model calibrated at z are fitted with T close to 3."""
        rng = np.random.default_rng(2)
        z = rng.normal(0, 2, 20_000)
        y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
        overconfident = 1 / (1 + np.exp(-3 * z))
        t = ev.fit_temperature(y, overconfident)
        assert pytest.approx(3.0, rel=0.05) == t
        calibrated = ev.apply_temperature(overconfident, t)
        assert ev.expected_calibration_error(y, calibrated) < 0.02
        assert ev.nll(y, calibrated) < ev.nll(y, overconfident)

    def test_calibrated_input_keeps_t_near_one(self) -> None:
        """Already calibrated scores keep T close to 1."""
        rng = np.random.default_rng(3)
        p = rng.random(20_000)
        y = (rng.random(p.size) < p).astype(int)
        assert pytest.approx(1.0, abs=0.08) == ev.fit_temperature(y, p)

    def test_platt_recovers_scale_and_shift(self) -> None:
        """Scores that are sigmoid((z - 1) * 2) of a calibrated logit z give a = 0.5, c = 1."""
        rng = np.random.default_rng(4)
        z = rng.normal(0.5, 2, 40_000)
        y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
        skewed = 1 / (1 + np.exp(-(z - 1.0) * 2.0))
        a, c = ev.fit_platt(y, skewed)
        assert pytest.approx(0.5, rel=0.05) == a
        assert pytest.approx(1.0, rel=0.08) == c

    def test_matches_serving_transform(self) -> None:
        """``apply_temperature`` is exactly what ``inference.calibrate`` serves."""
        from watcher.inference import calibrate

        p = np.array([0.01, 0.3, 0.5, 0.9, 0.999])
        assert np.allclose(calibrate(p, 2.5), ev.apply_temperature(p, 2.5))


class TestThreshold:
    def test_youden_with_sensitivity_floor(self) -> None:
        """Separable scores: the threshold falls between the classes."""
        y = [0, 0, 0, 1, 1, 1]
        p = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
        t = ev.choose_threshold(y, p, min_sensitivity=0.95)
        assert pytest.approx(0.45) == t
        assert ev.binary_metrics(y, p, t)["accuracy"] == 1.0

    def test_floor_overrides_youden(self) -> None:
        """Youden J alone cuts at 0.6 (J 0.75); the sensitivity floor forces the cut down to 0.3."""
        y = [0, 0, 1, 0, 0, 1, 1, 1]
        p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
        t_free = ev.choose_threshold(y, p, min_sensitivity=0.0)
        t_floor = ev.choose_threshold(y, p, min_sensitivity=0.95)
        assert pytest.approx(0.55) == t_free
        assert pytest.approx(0.25) == t_floor
        assert ev.binary_metrics(y, p, t_floor)["sensitivity"] == 1.0

    def test_one_class_falls_back(self) -> None:
        """With a single class there is nothing to choose: 0.5."""
        assert ev.choose_threshold([1, 1, 1], [0.2, 0.4, 0.9]) == 0.5


class TestReport:
    def test_full_report_and_text(self, tmp_path: Path) -> None:
        """full_report holds metrics, CIs, confusion matrix; format_report prints them; plots written."""
        y = [0, 0, 0, 1, 1, 1, 1]
        p = [0.1, 0.4, 0.6, 0.55, 0.7, 0.8, 0.95]
        rep = ev.full_report(y, p, 0.5, groups=[str(i) for i in range(7)], n_boot=50)
        assert rep["confusion_matrix"]["matrix"] == [[2, 1], [0, 4]]
        text = ev.format_report(rep)
        assert "sensitivity" in text and "95% CI" in text and "PNEUMONIA" in text
        written = ev.write_plots(tmp_path, y, p, 0.5, history={"loss": [0.7, 0.5], "val_loss": [0.8, 0.6]})
        assert set(ev.PLOT_FILES) == set(written)
        for name in written:
            assert (tmp_path / name).stat().st_size > 1000
