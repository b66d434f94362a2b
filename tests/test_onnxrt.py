"""ONNX Runtime serving: the same answers and heat maps as TensorFlow, or TensorFlow keeps serving."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import FULLRES, fixture_images
from watcher.config import Config
from watcher.explain import ExplainError, GradCam, forward_cam, linear_head_weights
from watcher.imaging import decode, input_floor, preprocess
from watcher.inference import Predictor
from watcher.onnxrt import MAX_DIFF, MAX_MAP_DIFF, OnnxModel, OnnxUnavailable
from watcher.report import read_rows
from watcher.service import Service

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "model_store"


def dense_head_model():  # type: ignore[no-untyped-def]
    """A small CNN with dsnet's head: conv block, max pool, GAP, dropout, Dense(1, sigmoid)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    head = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, head(x))
    # channels for and against: maps that are neither all zero nor all of the image
    head.set_weights([np.linspace(-0.5, 1.0, 16, dtype=np.float32)[:, None], np.zeros(1, np.float32)])
    return model


def seed_like_model():  # type: ignore[no-untyped-def]
    """The seed's head: flatten and a hidden Dense layer, so Grad-CAM's weights depend on the image."""
    import keras

    keras.utils.set_random_seed(4)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def batch(n: int = 12) -> np.ndarray:
    return np.random.default_rng(7).random((n, 32, 32, 1), dtype=np.float32)


class TestHeatMapsWithoutGradients:
    def test_a_linear_head_gives_grad_cams_map_from_the_forward_pass(self) -> None:
        model = dense_head_model()
        gc = GradCam(model)
        w = linear_head_weights(model, gc.layer_name)
        _, maps = gc.predict_and_explain(batch(), upsample=False)
        import keras

        acts = keras.Model(model.inputs[0], model.get_layer(gc.layer_name).output)(batch(), training=False)
        assert np.abs(forward_cam(np.asarray(acts), w) - maps).max() < 1e-5
        assert np.allclose(maps.max(axis=(1, 2)), 1.0) and (maps == 0).any()  # not zeros agreeing

    def test_a_hidden_dense_layer_is_refused(self) -> None:
        model = seed_like_model()
        with pytest.raises(ExplainError, match="Flatten"):
            linear_head_weights(model, GradCam(model).layer_name)


class TestOnnxModel:
    def test_answers_and_maps_match_tensorflow(self) -> None:
        model = dense_head_model()
        onnx = OnnxModel(model, 32, 32, with_maps=True, threads=1)
        x = batch()
        raw, maps = onnx.predict_and_explain(x)
        tf_raw, tf_maps = GradCam(model).predict_and_explain(x, upsample=False)
        assert np.abs(raw - tf_raw).max() <= MAX_DIFF
        assert np.abs(maps - tf_maps).max() <= MAX_MAP_DIFF
        assert np.allclose(maps.max(axis=(1, 2)), 1.0) and (maps == 0).any()  # real maps, not zeros
        assert np.abs(onnx.raw(x) - raw).max() == 0.0
        empty_raw, empty_maps = onnx.predict_and_explain(x[:0])
        assert (0,) == empty_raw.shape and (0, 32, 32) == empty_maps.shape

    def test_a_batch_runs_in_chunks_with_each_images_own_answer(self) -> None:
        """A batch longer than ``chunk`` runs in pieces (4 + 4 + 2 here); every image keeps its
        own probability and map, in order, as when scored alone."""
        onnx = OnnxModel(dense_head_model(), 32, 32, with_maps=True, threads=1)
        assert 4 == onnx.chunk
        x = batch(10)
        raw, maps = onnx.predict_and_explain(x)
        alone = [onnx.predict_and_explain(x[i : i + 1]) for i in range(len(x))]
        assert (10,) == raw.shape and (10, 32, 32) == maps.shape
        assert np.abs(raw - np.concatenate([r for r, _ in alone])).max() < 1e-6
        assert np.abs(maps - np.concatenate([m for _, m in alone])).max() < 1e-6
        assert len(set(np.round(raw, 6))) == 10  # ten different answers, so order is checked

    def test_no_maps_without_gradients_for_a_hidden_dense_layer(self) -> None:
        model = seed_like_model()
        with pytest.raises(OnnxUnavailable, match="no heat maps without gradients"):
            OnnxModel(model, 32, 32, with_maps=True)
        plain = OnnxModel(model, 32, 32, with_maps=False)  # scoring alone converts fine
        tf_raw = np.asarray(model(batch(), training=False)).reshape(-1)
        assert np.abs(plain.raw(batch()) - tf_raw).max() <= MAX_DIFF
        with pytest.raises(ExplainError):
            plain.predict_and_explain(batch())

    def test_the_shipped_model_on_real_radiographs(self) -> None:
        """The shipped version through ONNX Runtime: the same probabilities (calibrated) and
        heat maps as TensorFlow on the committed fixture radiographs, decoded as the daemon does."""
        tf_pred, ort_pred = Predictor(SHIPPED), Predictor(SHIPPED)
        ort_pred.use_onnx(with_maps=True)
        assert "onnxruntime" == ort_pred.runtime
        paths = fixture_images() + FULLRES
        x = np.stack(
            [
                preprocess(decode(p.read_bytes(), min_size=input_floor(tf_pred.spec)).image, tf_pred.spec)
                for p in paths
            ]
        )
        tf_raw, tf_maps = GradCam(tf_pred.model).predict_and_explain(x, upsample=False)
        raw, maps = ort_pred.onnx.predict_and_explain(x)
        assert np.abs(tf_pred.probabilities(x) - ort_pred.probabilities(x)).max() < 1e-4
        assert np.abs(raw - tf_raw).max() <= MAX_DIFF
        assert np.abs(maps - tf_maps).max() <= MAX_MAP_DIFF
        labels = [p.label for p in tf_pred.predictions(tf_raw)]
        assert labels == [p.label for p in ort_pred.predictions(raw)]
        assert {"NORMAL", "PNEUMONIA"} == set(labels)


class TestDaemon:
    def _rows(self, make_config: Callable[..., Config], **overrides: object) -> dict[str, dict[str, str]]:
        cfg = make_config(**overrides)
        for path in fixture_images()[:6]:
            shutil.copy(path, cfg.inbox / path.name)
        with capture_logs() as logs:
            assert 0 == Service(cfg).run(once=True)
        (loaded,) = [e for e in logs if e["event"] == "model_loaded"]
        assert overrides["runtime"] == loaded["runtime"]
        rows = {r["file"]: dict(r) for r in read_rows(cfg.results)}
        shutil.rmtree(cfg.results.parent)
        return rows

    def test_runtimes_give_the_same_rows(self, make_config: Callable[..., Config]) -> None:
        """runtime: onnxruntime and tensorflow label every file alike, probabilities within 1e-4."""
        tf_rows = self._rows(make_config, runtime="tensorflow")
        ort_rows = self._rows(make_config, runtime="onnxruntime")
        assert tf_rows.keys() == ort_rows.keys() and len(tf_rows) == 6
        for name, row in tf_rows.items():
            assert row["label"] == ort_rows[name]["label"]
            assert float(row["probability"]) == pytest.approx(float(ort_rows[name]["probability"]), abs=1e-4)
