"""Drift monitor: quiet on streams like validation, loud on shifted ones, references from metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from watcher import drift

REPO_STORE = Path(__file__).resolve().parent.parent / "model_store"
THRESHOLD = 0.5


def draw(rng: np.random.Generator, n: int, prevalence: float, normal_shift: float = 0.0) -> tuple:
    """Scores of a simple two-class model: logits N(-4, 2) for NORMAL, N(5, 2) for PNEUMONIA."""
    y = (rng.random(n) < prevalence).astype(int)
    z = np.where(y == 1, rng.normal(5.0, 2.0, n), rng.normal(-4.0 + normal_shift, 2.0, n))
    return y, 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def validation() -> tuple[np.ndarray, np.ndarray, dict]:
    """A validation set of 1,437 images at 77% PNEUMONIA (like v0002's) and its reference."""
    y, p = draw(np.random.default_rng(0), 1437, 0.77)
    return y, p, drift.reference_from_scores(y, p, THRESHOLD)


class TestReference:
    def test_from_scores(self, validation: tuple[np.ndarray, np.ndarray, dict]) -> None:
        """Per-class histograms sum to the class counts; share, sensitivity and prevalence agree."""
        y, p, ref = validation
        assert (int((y == 0).sum()), int(y.sum())) == (
            sum(ref["normal_counts"]),
            sum(ref["pneumonia_counts"]),
        )
        assert pytest.approx(float((p >= THRESHOLD).mean())) == ref["positive_share"]
        assert pytest.approx(float(y.mean())) == ref["prevalence"]

    def test_v0002_rebuilt_from_metrics(self) -> None:
        """v0002 has no stored reference: it is rebuilt from metrics.json (1,437 images, 334 NORMAL)."""
        meta = json.loads((REPO_STORE / "v0002" / "metadata.json").read_text())
        metrics = json.loads((REPO_STORE / "v0002" / "metrics.json").read_text())
        ref = drift.reference_from_metadata(meta, metrics)
        assert ref is not None
        assert (334, 1103) == (sum(ref["normal_counts"]), sum(ref["pneumonia_counts"]))
        assert pytest.approx(meta["threshold"]) == ref["threshold"]
        drift.DriftMonitor(ref)  # usable

    def test_stored_reference_wins_and_none_without_data(self, validation: tuple) -> None:
        """A stored validation_reference is used as is; with neither it nor metrics there is none."""
        ref = validation[2]
        assert ref == drift.reference_from_metadata({"validation_reference": ref}, None)
        assert drift.reference_from_metadata({"threshold": 0.5}, None) is None
        assert drift.reference_from_metadata({"threshold": 0.5}, {"reliability": []}) is None


class TestMonitor:
    def test_quiet_on_streams_like_validation(self, validation: tuple) -> None:
        """Fresh draws from the validation distribution: at most 1 alarm in 200 windows of 500."""
        ref = validation[2]
        rng = np.random.default_rng(1)
        alarms = 0
        for _ in range(200):
            _, p = draw(rng, 500, 0.77)
            alarms += drift.DriftMonitor(ref, every=500).update(p) is not None
        assert alarms <= 1

    def test_quiet_on_validation_itself(self, validation: tuple) -> None:
        """Windows resampled from the validation scores themselves never warn."""
        _, p, ref = validation
        rng = np.random.default_rng(2)
        monitor = drift.DriftMonitor(ref, window=500, every=100)
        reports = [monitor.update(rng.choice(p, 100)) for _ in range(50)]
        assert [] == [r for r in reports if r is not None]
        assert monitor.check().drift is False

    def test_fires_on_shifted_normal_scores(self, validation: tuple) -> None:
        """NORMAL images scored 2 logits higher (as at another device): the score test fires."""
        ref = validation[2]
        _, p = draw(np.random.default_rng(3), 500, 0.77, normal_shift=3.0)
        report = drift.DriftMonitor(ref, every=500).update(p)
        assert report is not None and "scores" in report.reasons
        assert "xray-watcher calibrate" in report.message

    def test_mix_change_is_not_a_score_drift(self, validation: tuple) -> None:
        """At 30% PNEUMONIA the scores still fit validation's classes; only the share test fires."""
        ref = validation[2]
        _, p = draw(np.random.default_rng(4), 500, 0.30)
        report = drift.DriftMonitor(ref, every=500).update(p)
        assert report is not None and ["positive_share"] == report.reasons
        assert pytest.approx(0.30, abs=0.06) == report.estimated_prevalence
        assert drift.DriftMonitor(ref, every=500, prevalence=0.3).update(p) is None

    def test_waits_for_enough_files_and_paces_checks(self, validation: tuple) -> None:
        """No check before min_files, then one every ``every`` files."""
        ref = validation[2]
        shifted = draw(np.random.default_rng(5), 400, 0.77, normal_shift=3.0)[1]
        monitor = drift.DriftMonitor(ref, min_files=100, every=50)
        assert monitor.update(shifted[:99]) is None
        assert monitor.update(shifted[99:100]) is not None
        assert monitor.update(shifted[100:149]) is None
        assert monitor.update(shifted[149:150]) is not None

    def test_the_tests_library_is_loaded_with_the_monitor(self, validation: tuple) -> None:
        """scipy.stats is imported when the monitor is built (before the daemon is ready), not
        at its first check, where the import stalled a burst for 1.3 s."""
        _, _, ref = validation
        code = (
            "import sys, json; from watcher import drift; before = 'scipy.stats' in sys.modules; "
            f"drift.DriftMonitor(json.loads({json.dumps(json.dumps(ref))})); "
            "print(before, 'scipy.stats' in sys.modules)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert "False True" == out.stdout.strip()

    def test_bad_reference(self) -> None:
        """A reference without both class histograms is a ValueError."""
        with pytest.raises(ValueError, match="normal_counts"):
            drift.DriftMonitor({"normal_counts": [0] * 10, "pneumonia_counts": [1] * 10, "threshold": 0.5})
