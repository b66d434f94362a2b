"""Calibration at a stated prevalence, threshold rules, power, and ``xray-watcher calibrate``."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from watcher import calibration as cal
from watcher import model_store, site
from watcher.errors import EvaluationError
from watcher.inference import Predictor, calibrate

REPO_STORE = Path(__file__).resolve().parent.parent / "model_store"
TRAIN_FIXTURES = Path(__file__).parent / "fixtures" / "train"


def synthetic(n: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw scores whose true PNEUMONIA probability is sigmoid(logit), mix ``prevalence``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    z = np.where(y == 1, rng.normal(1.5, 1.5, n), rng.normal(-1.5, 1.5, n))
    return y, 1 / (1 + np.exp(-2 * z))  # an overconfident model: scale 2


class TestPrevalence:
    def test_balanced_platt_states_prevalence(self) -> None:
        """Balanced weights calibrate for 0.5 whatever the sample's mix; 'validation' keeps the mix."""
        y, raw = synthetic(20_000, 0.77, 0)
        assert 0.5 == cal.fit_calibration(y, raw, "balanced").assumed_prevalence
        assert pytest.approx(float(y.mean())) == cal.fit_calibration(y, raw, "validation").assumed_prevalence

    def test_prior_shift_matches_a_fit_at_that_mix(self) -> None:
        """Balanced calibration re-expressed for 77% equals the calibration fitted on the 77% mix."""
        y, raw = synthetic(40_000, 0.77, 1)
        balanced = cal.fit_calibration(y, raw, "balanced")
        at_mix = cal.fit_calibration(y, raw, "validation")
        moved = cal.shift_for_prevalence(balanced, float(y.mean()))
        grid = np.linspace(0.02, 0.98, 25)
        assert np.allclose(at_mix.apply(grid), moved.apply(grid), atol=0.01)
        assert np.allclose(
            moved.apply(grid), cal.prior_shift(balanced.apply(grid), 0.5, float(y.mean())), atol=1e-9
        )

    def test_served_transform_with_shift(self) -> None:
        """``inference.calibrate`` with a logit shift is what ``Calibration.apply`` computes."""
        c = cal.Calibration("x", temperature=1.7, logit_shift=-0.8, assumed_prevalence=0.5, prior="balanced")
        p = np.array([1e-9, 0.01, 0.3, 0.5, 0.9, 1.0])
        assert np.allclose(c.apply(p), calibrate(p, 1.7, -0.8))
        assert np.allclose(calibrate(p, 1.7), calibrate(p, 1.7, 0.0))

    def test_separable_sample_has_finite_fit(self) -> None:
        """Platt's smoothed targets keep the fit finite on perfectly separated scores."""
        a, c = cal.fit_platt([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
        assert np.isfinite(a) and np.isfinite(c) and 0 < a < 20


class TestThresholdRules:
    Y = (0, 0, 1, 0, 0, 1, 1, 1, 1, 1)
    P = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def test_max_specificity_takes_the_highest_cut_meeting_the_floor(self) -> None:
        """Floor 0.8 (5 of 6 positives): best specificity cuts at 0.5 (spec 1.0), Youden lower."""
        t = cal.choose_threshold(self.Y, self.P, 0.8, rule="max_specificity")
        assert pytest.approx(0.45) == t
        assert pytest.approx(0.45) == cal.choose_threshold(self.Y, self.P, 0.8, rule="youden_floor")
        # sensitivity 1.0 asked: the cut must go below 0.25
        assert pytest.approx(0.225) == cal.choose_threshold(self.Y, self.P, 0.99, rule="max_specificity")

    def test_margin_raises_the_floor(self) -> None:
        """A margin asks for more sensitivity than the floor: 0.8 + 0.1 needs all 6 positives."""
        t = cal.choose_threshold(self.Y, self.P, 0.8, rule="max_specificity", margin=0.1)
        assert pytest.approx(0.225) == t

    def test_unknown_rule(self) -> None:
        """An unknown rule name is a ValueError naming the known ones."""
        with pytest.raises(ValueError, match="max_specificity"):
            cal.choose_threshold(self.Y, self.P, rule="f1")


class TestPower:
    @pytest.mark.parametrize(
        ("n", "misses", "below"), [(27, 0, True), (100, 0, True), (125, 0, False), (300, 5, True)]
    )
    def test_wilson_lower_bound(self, n: int, misses: int, below: bool) -> None:
        """Whether n positives with some missed can show sensitivity >= 0.97 (95% Wilson bound)."""
        assert below == (cal.sensitivity_lower_bound(n, misses) < 0.97)

    def test_min_positives(self) -> None:
        """125 positives, none missed, are the fewest that show 0.97."""
        assert 125 == cal.min_positives_for(0.97)


class TestSiteThreshold:
    """``site.site_threshold``: the base version's cut, moved only where the sample gives reason."""

    BASE = 0.5  # the base version's cut, as a model output

    @staticmethod
    def sample(pos: list[float], n_neg: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        neg = rng.uniform(0.01, 0.3, n_neg)
        return np.r_[np.zeros(n_neg, int), np.ones(len(pos), int)], np.r_[neg, pos]

    def fit(self, pos: list[float]) -> tuple[float, dict, cal.Calibration, float]:
        y, raw = self.sample(pos)
        c = cal.fit_calibration(y, raw, "balanced")
        thr, decision = site.site_threshold(y, raw, c, 0.97, "max_specificity", self.BASE)
        plain, _ = site.site_threshold(y, raw, c, 0.97, "max_specificity", None)
        return thr, decision, c, plain

    def test_two_hard_cases_among_fifty_keep_the_base_cut(self) -> None:
        """Two PNEUMONIA images below the base's cut among 50 is what a 0.97-0.98 sensitivity
        gives by chance: the plain rule would put the cut under the second (here 0.05)."""
        pos = [0.04, 0.06, *np.linspace(0.6, 0.99, 48)]
        thr, decision, c, plain = self.fit(pos)
        assert "kept" == decision["decision"] and 2 == decision["missed_at_base_cut"]
        assert thr == pytest.approx(float(c.apply(np.array([self.BASE]))[0]))
        assert plain < thr  # what it would have been

    def test_many_misses_lower_the_cut(self) -> None:
        """Six of 50 below the base's cut: more than chance at 0.97 (p < 0.01), so it goes down."""
        pos = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, *np.linspace(0.6, 0.99, 44)]
        thr, decision, c, plain = self.fit(pos)
        assert "lowered" == decision["decision"] and decision["p_value_missed"] < 0.01
        assert thr == plain < float(c.apply(np.array([self.BASE]))[0])

    def test_confident_positives_raise_it_with_the_floor_met_in_expectation(self) -> None:
        """All 50 far above the cut: raised to just under the lowest (no miss allowed at n = 50:
        (0 + 1) / 51 <= 0.03 < (1 + 1) / 51)."""
        pos = list(np.linspace(0.8, 0.99, 50))
        thr, decision, c, _ = self.fit(pos)
        assert "raised" == decision["decision"] and 0 == decision["misses_allowed"]
        low = float(c.apply(np.array([0.8]))[0])
        assert float(c.apply(np.array([self.BASE]))[0]) < thr < low

    def test_too_few_positives_never_raise_it(self) -> None:
        """32 PNEUMONIA images: (0 + 1) / 33 > 0.03, so not even a cut under the lowest is allowed."""
        y, raw = self.sample(list(np.linspace(0.8, 0.99, 32)))
        c = cal.fit_calibration(y, raw, "balanced")
        thr, decision = site.site_threshold(y, raw, c, 0.97, "max_specificity", self.BASE)
        assert "kept" == decision["decision"] and thr == decision["threshold_at_base_cut"]

    def test_base_cut_of_a_version(self) -> None:
        """The model output at which the served probability equals the threshold."""
        raw = site.base_raw_cut(0.6, 0.9, 0.4)
        assert float(calibrate(np.array([raw]), 0.9, 0.4)[0]) == pytest.approx(0.6)


# ------------------------------------------------------------------ calibrate


def _variants(img: np.ndarray) -> list[np.ndarray]:
    """Three real-looking variants of a fixture radiograph: as is, a 90% crop, brighter."""
    h, w = img.shape
    crop = cv2.resize(img[h // 20 : h - h // 20, w // 20 : w - w // 20], (w, h))
    bright = cv2.convertScaleAbs(img, alpha=1.0, beta=15)
    return [img, crop, bright]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 NORMAL + 27 PNEUMONIA images: three variants of each fixture, patient ids kept in names."""
    root = tmp_path_factory.mktemp("site") / "sample"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((TRAIN_FIXTURES / cls).glob("*.jpeg")):
            img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
            for i, var in enumerate(_variants(img)):
                sep = "-" if cls == "NORMAL" else "_"
                cv2.imwrite(str(root / cls / f"{src.stem}{sep}{i + 1:04d}.jpeg"), var)
    return root


@pytest.fixture(scope="module")
def calibrated(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the real v0002 store, recalibrated on the sample with promote=True."""
    store = tmp_path_factory.mktemp("store") / "model_store"
    store.mkdir()
    shutil.copytree(REPO_STORE / "v0002", store / "v0002")
    (store / "CURRENT").write_text("v0002\n")
    with capture_logs() as logs:
        version = site.calibrate_site(sample, store, "v0002", promote=True, n_boot=200)
    warnings = [e for e in logs if e["event"] == "calibrate_sample_warning"]
    (store / "warnings.txt").write_text("\n".join(e["warning"] for e in warnings))
    assert version == model_store.current_version(store)
    return store, version


class TestCalibrateSite:
    def test_command_line(self) -> None:
        """The calibrate options and their defaults (the store: the config's, unless given)."""
        parser = argparse.ArgumentParser()
        site.add_arguments(parser)
        args = parser.parse_args(["--data", "sample"])
        assert (Path("sample"), "config.yaml", None, None, 0.97, False) == (
            args.data,
            args.config,
            args.store,
            args.base,
            args.min_sensitivity,
            args.promote,
        )

    def test_weights_byte_identical(self, calibrated: tuple[Path, str]) -> None:
        """model.keras is the base's, byte for byte."""
        store, version = calibrated
        assert "v0003" == version
        base = (store / "v0002" / "model.keras").read_bytes()
        assert base == (store / version / "model.keras").read_bytes()
        # v0002 has no model.onnx: one is exported for the new version, from those weights
        info = json.loads((store / version / "model.onnx.json").read_text())
        assert hashlib.sha256(base).hexdigest() == info["source_sha256"]

    def test_metadata_names_base_and_sample(self, calibrated: tuple[Path, str], sample: Path) -> None:
        """metadata.json records the base, the counts per class and each file's sha256."""
        store, version = calibrated
        meta = model_store.read_metadata(store, version)
        assert "v0002" == meta["base_version"]
        assert {"NORMAL": 24, "PNEUMONIA": 27} == meta["site_calibration"]["images"]
        files = {f["file"]: f["sha256"] for f in meta["site_calibration"]["files"]}
        one = sorted(sample.glob("NORMAL/*.jpeg"))[0]
        assert hashlib.sha256(one.read_bytes()).hexdigest() == files[f"NORMAL/{one.name}"]
        assert 51 == len(files)
        assert meta["intended_population"]
        assert 0.5 == meta["calibration"]["assumed_prevalence"]
        assert {"normal_counts", "pneumonia_counts"} <= set(meta["validation_reference"])
        decision = meta["site_calibration"]["threshold_decision"]  # anchored on v0002's cut
        base = Predictor(store, "v0002")
        assert decision["base_cut_model_output"] == pytest.approx(
            site.base_raw_cut(base.threshold, base.temperature, base.logit_shift)
        )
        assert 27 == decision["pneumonia_images"] and decision["decision"] in ("kept", "lowered", "raised")
        if decision["decision"] == "kept":
            assert meta["threshold"] == pytest.approx(decision["threshold_at_base_cut"])

    def test_calibration_and_threshold_change_and_are_served(self, calibrated: tuple[Path, str]) -> None:
        """Threshold, temperature and shift differ from v0002's, and Predictor serves them."""
        store, version = calibrated
        base, new = Predictor(store, "v0002"), Predictor(store, version)
        assert (base.threshold, base.temperature, 0.0) != (new.threshold, new.temperature, new.logit_shift)
        x = np.random.default_rng(0).random((3, 128, 128, 1)).astype(np.float32)
        raw = np.asarray(base.model.predict_on_batch(x)).reshape(-1)
        assert np.allclose(calibrate(raw, new.temperature, new.logit_shift), new.probabilities(x))

    def test_cross_validated_metrics_with_intervals(self, calibrated: tuple[Path, str]) -> None:
        """metrics.json holds cross-validated figures with 95% intervals around them."""
        store, version = calibrated
        metrics = model_store.read_json(store, version, model_store.METRICS_FILE)
        assert metrics["cross_validation"]["folds"] >= 2
        for name in ("sensitivity", "specificity", "roc_auc"):
            lo, hi = metrics["ci95"][name]
            assert lo - 1e-9 <= metrics["metrics"][name] <= hi + 1e-9

    def test_warns_about_power(self, calibrated: tuple[Path, str]) -> None:
        """27 PNEUMONIA images cannot show 0.97: the warning gives the bound and the 125 needed."""
        store, version = calibrated
        text = (store / "warnings.txt").read_text()
        assert "lower bound" in text and "125" in text
        assert model_store.read_metadata(store, version)["site_calibration"]["warnings"]

    def test_copies_are_counted_once_and_an_image_in_both_classes_refused(
        self, sample: Path, tmp_path: Path, calibrated: tuple[Path, str]
    ) -> None:
        """19 NORMAL images plus a copy of one under another name is 19, not 20: refused (a
        copy would also sit in two folds); one image in NORMAL/ and PNEUMONIA/ is refused with
        both names; an unreadable file is skipped. Nothing is published."""
        store, _ = calibrated
        before = model_store.list_versions(store)
        copies = tmp_path / "copies"
        for cls in ("NORMAL", "PNEUMONIA"):
            (copies / cls).mkdir(parents=True)
            for f in sorted((sample / cls).glob("*.jpeg"))[: 19 if cls == "NORMAL" else 20]:
                shutil.copy(f, copies / cls / f.name)
        first = sorted((copies / "NORMAL").glob("*.jpeg"))[0]
        shutil.copy(first, copies / "NORMAL" / "again.jpeg")
        (copies / "NORMAL" / "locked.jpeg").symlink_to("/proc/self/mem")  # read() fails: EIO
        with pytest.raises(EvaluationError, match="at least 20 per class"):
            site.calibrate_site(copies, store, "v0002")
        both = tmp_path / "both"
        shutil.copytree(sample, both)
        shutil.copy(sorted((both / "NORMAL").glob("*.jpeg"))[3], both / "PNEUMONIA" / "mislabelled.jpeg")
        with pytest.raises(
            EvaluationError, match=r"the same image is both NORMAL and PNEUMONIA: .*mislabelled\.jpeg"
        ):
            site.calibrate_site(both, store, "v0002")
        assert before == model_store.list_versions(store)

    def test_refuses_small_sample(self, sample: Path, tmp_path: Path, calibrated: tuple[Path, str]) -> None:
        """19 images of a class is a clear error (exit 1 from the CLI); nothing is published."""
        store, _ = calibrated
        small = tmp_path / "small"
        for cls in ("NORMAL", "PNEUMONIA"):
            (small / cls).mkdir(parents=True)
            for f in sorted((sample / cls).glob("*.jpeg"))[:19]:
                shutil.copy(f, small / cls / f.name)
        before = model_store.list_versions(store)
        with pytest.raises(EvaluationError, match="at least 20 per class"):
            site.calibrate_site(small, store, "v0002")
        args = argparse.Namespace(data=small, store=store, base="v0002", min_sensitivity=0.97, promote=False)
        assert 1 == site.cli_main(args)
        assert before == model_store.list_versions(store)

    def test_a_version_with_a_graph_is_calibrated_without_tensorflow(
        self, sample: Path, tmp_path: Path
    ) -> None:
        """calibrate on a base with a usable model.onnx (the shipped v0004), in a fresh process:
        its outputs come from that graph, the new version keeps the base's graph and record
        (same weights) and serves from them, and TensorFlow is never imported."""
        import subprocess
        import sys

        store = tmp_path / "model_store"
        store.mkdir()
        shutil.copytree(REPO_STORE / "v0004", store / "v0004", ignore=shutil.ignore_patterns("*.png"))
        (store / "CURRENT").write_text("v0004\n")
        code = (
            "import sys; from watcher.cli import main; "
            "rc = main(['calibrate', '--data', sys.argv[1], '--store', sys.argv[2]]); "
            "print(rc, 'tensorflow' in sys.modules)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(sample), str(store)], capture_output=True, text=True, timeout=300
        )
        assert 0 == proc.returncode, proc.stderr[-2000:]
        assert "0 False" == proc.stdout.split("\n")[-2]
        assert "onnx_graph_kept" in proc.stderr
        (new,) = [v for v in model_store.list_versions(store) if v != "v0004"]
        for name in ("model.keras", "model.onnx", "model.onnx.json"):
            assert (store / "v0004" / name).read_bytes() == (store / new / name).read_bytes()
        pred = Predictor(store, new, load_model=False)
        pred.use_onnx(with_maps=True, threads=1)
        assert "model.onnx" == pred.onnx_graph
