"""End-to-end training on the fixture images: a complete, loadable, correctly promoted version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from watcher import evaluation, model_store, onnxrt
from watcher.augment import AugmentOptions, augment_grey
from watcher.errors import TrainingError
from watcher.imaging import PreprocessSpec
from watcher.inference import Predictor
from watcher.train import TrainOptions, compare_with_current, train

TRAIN_FIXTURES = Path(__file__).parent / "fixtures" / "train"
CONST_SPEC = PreprocessSpec(height=32, width=32)


def publish_constant(store: Path, value: float = 0.7) -> str:
    """Publish and promote a real Keras model that outputs ``value`` for every image (AUC 0.5)."""
    import keras

    inputs = keras.Input((32, 32, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, out)
    logit = float(np.log(value / (1 - value)))
    model.layers[-1].set_weights([np.zeros((1, 1), "float32"), np.array([logit], "float32")])
    build = model_store.new_build_dir(store)
    model.save(build / model_store.MODEL_FILE)
    meta = {
        "preprocessing": CONST_SPEC.to_dict(),
        "threshold": 0.5,
        "temperature": 1.0,
        "class_names": ["NORMAL", "PNEUMONIA"],
    }
    (build / model_store.METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
    version = model_store.publish(store, build)
    model_store.set_current(store, version, reason="test")
    return version


def tiny_options(store: Path, **kw: object) -> TrainOptions:
    """Options for a one-epoch run of the test-only ``tiny`` arch on the fixtures."""
    args: dict[str, object] = {
        "data": TRAIN_FIXTURES,
        "store": store,
        "arch": "tiny",
        "epochs": 1,
        "n_boot": 50,
        **kw,
    }
    return TrainOptions(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny training run on the fixtures into a fresh store, shared by the tests below."""
    store = tmp_path_factory.mktemp("store")
    return store, train(tiny_options(store, epochs=2))


class TestTrain:
    def test_publishes_complete_version(self, trained: tuple[Path, str]) -> None:
        """The version holds model, metadata, metrics and the four plots."""
        store, version = trained
        files = {p.name for p in (store / version).iterdir()}
        expected = {
            model_store.MODEL_FILE,
            model_store.METADATA_FILE,
            model_store.METRICS_FILE,
            *evaluation.PLOT_FILES,
            onnxrt.ONNX_FILE,  # the daemon serves it without TensorFlow
            onnxrt.ONNX_INFO,
        }
        assert expected <= files
        pred = Predictor(store, version, load_model=False)
        pred.use_onnx(with_maps=False, threads=1)
        assert ("model.onnx", None) == (pred.onnx_graph, pred._model)

    def test_metadata_contract(self, trained: tuple[Path, str]) -> None:
        """metadata.json carries what Predictor and the report need."""
        store, version = trained
        meta = model_store.read_metadata(store, version)
        assert version == meta["version"]
        assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
        assert 0 < meta["threshold"] < 1 and meta["temperature"] > 0
        assert pytest.approx(meta["temperature"]) == meta["calibration"]["temperature"]
        assert meta["training"]["split"]["method"] == "era"
        assert meta["training"]["images"] == {"NORMAL": 8, "PNEUMONIA": 9}
        assert {"python", "tensorflow", "keras", "numpy", "opencv"} <= set(meta["library_versions"])
        metrics = model_store.read_json(store, version, model_store.METRICS_FILE)
        assert set(evaluation.METRIC_NAMES) <= set(metrics["ci95"])

    def test_calibration_in_metadata_not_weights(self, trained: tuple[Path, str]) -> None:
        """The Platt shift is served from metadata, at a stated prevalence; a drift reference is stored."""
        store, version = trained
        meta = model_store.read_metadata(store, version)
        assert pytest.approx(meta["logit_shift"]) == meta["calibration"]["logit_shift"]
        assert 0.5 == meta["calibration"]["assumed_prevalence"]
        assert meta["validation"]["threshold_rule"].startswith("best specificity")
        ref = meta["validation_reference"]
        assert meta["validation"]["n_images"] == sum(ref["normal_counts"]) + sum(ref["pneumonia_counts"])
        pred = Predictor(store, version)
        x = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
        raw = np.asarray(pred.model.predict_on_batch(x)).reshape(-1)
        expected = evaluation.apply_temperature(raw, meta["temperature"], meta["logit_shift"])
        assert np.allclose(expected, pred.probabilities(x))

    def test_first_version_becomes_current_and_loads(self, trained: tuple[Path, str]) -> None:
        """With no current version the new one is promoted, and Predictor serves it."""
        store, version = trained
        assert version == model_store.current_version(store)
        pred = Predictor(store)
        assert (pred.spec.height, pred.spec.width) == (32, 32)
        assert pred.probabilities(np.zeros((2, 32, 32, 1), np.float32)).shape == (2,)

    def test_evaluate_folder_same_report(self, trained: tuple[Path, str], tmp_path: Path) -> None:
        """evaluate_folder scores the fixture folder, skips a broken file and writes the report."""
        store, _ = trained
        data = tmp_path / "data"
        shutil.copytree(TRAIN_FIXTURES, data)
        (data / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        rep = evaluation.evaluate_folder(Predictor(store), data, report_dir=tmp_path / "report", n_boot=20)
        assert rep["n_images"] == 17 and rep["n_skipped"] == 1
        assert (tmp_path / "report" / "metrics.json").is_file()
        assert "confusion matrix" in evaluation.format_report(rep)


class TestPromotion:
    def test_not_better_is_not_promoted(self, tmp_path: Path) -> None:
        """A new version that does not beat the current AUC on the same split stays unpromoted."""
        publish_constant(tmp_path)
        val = [np.full((40, 40), 100, np.uint8), np.full((40, 40), 200, np.uint8)]
        decision = compare_with_current(tmp_path, 0.5, val, np.array([0, 1]), {"method": "era"})
        assert (decision["promote"], decision["current_val_auc"]) == (False, 0.5)
        decision = compare_with_current(tmp_path, 0.8, val, np.array([0, 1]), {"method": "era"})
        assert decision["promote"] is True

    def test_train_follows_decision(self, tmp_path: Path) -> None:
        """train() moves CURRENT exactly when its comparison says the new version is better."""
        old = publish_constant(tmp_path)
        new = train(tiny_options(tmp_path))
        decision = model_store.read_metadata(tmp_path, new)["promotion"]
        assert old == decision["current"]
        assert (new if decision["promote"] else old) == model_store.current_version(tmp_path)

    def test_promote_flag_and_rollback(self, tmp_path: Path) -> None:
        """--promote always switches CURRENT, and rollback returns to the previous version."""
        old = publish_constant(tmp_path)
        new = train(tiny_options(tmp_path, promote=True))
        assert new == model_store.current_version(tmp_path)
        assert old == model_store.rollback(tmp_path)
        assert old == Predictor(tmp_path).version


class TestErrors:
    def test_missing_class_folder(self, tmp_path: Path) -> None:
        """A folder without PNEUMONIA/ is a TrainingError naming it."""
        shutil.copytree(TRAIN_FIXTURES / "NORMAL", tmp_path / "data" / "NORMAL")
        with pytest.raises(TrainingError, match="PNEUMONIA"):
            train(tiny_options(tmp_path / "store", data=tmp_path / "data"))

    def test_too_few_patients(self, tmp_path: Path) -> None:
        """Two patients per class cannot make a patient-level split."""
        for cls in ("NORMAL", "PNEUMONIA"):
            (tmp_path / "data" / cls).mkdir(parents=True)
            for src in sorted((TRAIN_FIXTURES / cls).iterdir())[:2]:
                shutil.copy(src, tmp_path / "data" / cls / src.name)
        with pytest.raises(TrainingError, match="at least 3"):
            train(tiny_options(tmp_path / "store", data=tmp_path / "data"))


class TestAugment:
    def test_shape_dtype_and_determinism(self) -> None:
        """Augmentation keeps shape and dtype and is reproducible from the seed."""
        img = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 4, (48, 1))
        a = augment_grey(img, np.random.default_rng([1, 2]), AugmentOptions())
        b = augment_grey(img, np.random.default_rng([1, 2]), AugmentOptions())
        assert (img.shape, np.uint8) == (a.shape, a.dtype)
        assert np.array_equal(a, b)

    def test_class_aspect_changes_shape_by_class(self) -> None:
        """With p_class_aspect=1 a centred square gets taller for NORMAL and wider for PNEUMONIA."""
        img = np.zeros((64, 64), np.uint8)
        img[24:40, 24:40] = 255
        still = AugmentOptions(
            rotate_deg=0,
            scale=(1, 1),
            shift=0,
            p_downup=0,
            p_blur=0,
            p_sharpen=0,
            p_gamma=0,
            p_contrast=0,
            p_noise=0,
            p_jpeg=0,
            p_class_aspect=1.0,
            aspect=1.0,
        )

        def size(label: int) -> tuple[int, int]:
            out = augment_grey(img, np.random.default_rng(0), still, label) > 127
            return int(out.any(axis=1).sum()), int(out.any(axis=0).sum())  # (height, width)

        assert (16, 16) == size(-1)
        assert size(0)[0] > 16 == size(0)[1]
        assert size(1)[1] > 16 == size(1)[0]


class TestArchitectures:
    def test_seed_parameter_count(self) -> None:
        """--arch seed reproduces the seed CNN: 651,009 parameters, 150x150x1 in, (n, 1) out."""
        from watcher.architectures import build

        model = build("seed")
        assert (651_009, (None, 150, 150, 1), (None, 1)) == (
            model.count_params(),
            tuple(model.input_shape),
            tuple(model.output_shape),
        )

    def test_default_arch_is_small(self) -> None:
        """The default architecture stays compact (well under 1 M parameters)."""
        from watcher.architectures import DEFAULT_ARCH, build, defaults

        model = build(DEFAULT_ARCH)
        assert model.count_params() < 1_000_000
        assert (defaults(DEFAULT_ARCH).spec.height, 1) == (model.input_shape[1], model.output_shape[1])

    def test_unknown_arch(self) -> None:
        """An unknown name is a ValueError listing the known ones."""
        from watcher.architectures import build

        with pytest.raises(ValueError, match="seed"):
            build("resnet9000")
