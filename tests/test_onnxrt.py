"""ONNX Runtime serving: the same answers and heat maps as TensorFlow, or TensorFlow keeps serving."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import FULLRES, fixture_images
from tests.harness import run_once
from watcher.config import Config
from watcher.explain import ExplainError, GradCam, forward_cam, linear_head_weights
from watcher.imaging import decode, input_floor, preprocess
from watcher.inference import Predictor
from watcher.onnxrt import (
    MAX_DIFF,
    MAX_MAP_DIFF,
    ONNX_FILE,
    ONNX_INFO,
    OnnxModel,
    OnnxUnavailable,
    export_artifact,
)
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


def _saved(model, folder: Path) -> Path:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    return folder


class TestStoredGraph:
    """A version's ``model.onnx``: exported at publish, served without TensorFlow, refused
    (so the model is converted as before) whenever it does not match the model."""

    def test_exported_graph_answers_like_the_converted_one(self, tmp_path: Path) -> None:
        model = dense_head_model()
        folder = _saved(model, tmp_path / "v")
        assert export_artifact(folder) is True
        assert export_artifact(folder) is False  # a matching pair is kept, not made again
        stored = OnnxModel.from_artifact(folder, 32, 32, with_maps=True, threads=1)
        converted = OnnxModel(model, 32, 32, with_maps=True, threads=1)
        raw, maps = stored.predict_and_explain(batch())
        ref_raw, ref_maps = converted.predict_and_explain(batch())
        assert np.abs(raw - ref_raw).max() < 1e-6 and np.abs(maps - ref_maps).max() < 1e-6
        assert np.abs(stored.raw(batch()) - raw).max() == 0.0
        assert np.allclose(maps.max(axis=(1, 2)), 1.0) and (maps == 0).any()  # real maps
        info = json.loads((folder / ONNX_INFO).read_text())
        assert hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest() == info["source_sha256"]
        assert 0o644 == (folder / ONNX_FILE).stat().st_mode & 0o777

    @pytest.mark.parametrize(
        ("damage", "reason"),
        [
            ("other model", "made from another model.keras"),
            ("graph byte", "does not match its record"),
            ("probe answers", "differ from TensorFlow's recorded"),
            ("probe maps", "differ from TensorFlow's recorded Grad-CAM"),
            ("no record", "unreadable"),
            ("record not an object", "unreadable: a JSON list"),
            ("probe maps not numbers", "unreadable"),
            ("head weights of another size", "head weights do not fit"),
            ("no graph", "has no model.onnx"),
            ("no model", "cannot read"),
        ],
    )
    def test_a_graph_that_does_not_match_is_refused(self, tmp_path: Path, damage: str, reason: str) -> None:
        folder = _saved(dense_head_model(), tmp_path / "v")
        export_artifact(folder)
        info_path, graph_path = folder / ONNX_INFO, folder / ONNX_FILE
        info = json.loads(info_path.read_text())
        if damage == "other model":
            seed_like_model().save(folder / "model.keras")
        elif damage == "graph byte":
            data = bytearray(graph_path.read_bytes())
            data[len(data) // 2] ^= 0x01
            graph_path.write_bytes(bytes(data))
        elif damage == "probe answers":
            info["probe"]["probabilities"][0] += 0.01
            info_path.write_text(json.dumps(info))
        elif damage == "probe maps":
            info["probe"]["maps"][1][2][3] += 0.01
            info_path.write_text(json.dumps(info))
        elif damage == "no record":
            info_path.unlink()
        elif damage == "record not an object":
            info_path.write_text("[]")
        elif damage == "probe maps not numbers":
            info["probe"]["maps"] = "garbage"
            info_path.write_text(json.dumps(info))
        elif damage == "head weights of another size":
            info["head_weights"] = info["head_weights"][:-1]
            info_path.write_text(json.dumps(info))
        elif damage == "no model":
            (folder / "model.keras").unlink()
        else:
            graph_path.unlink()
        with pytest.raises(OnnxUnavailable, match=reason):
            OnnxModel.from_artifact(folder, 32, 32, with_maps=True, threads=1)
        if damage in ("other model", "graph byte", "no graph"):
            assert export_artifact(folder) is True  # made again, and then it serves
            OnnxModel.from_artifact(folder, 32, 32, with_maps=damage != "other model", threads=1)

    def test_a_head_that_needs_gradients_exports_scores_only(self, tmp_path: Path) -> None:
        model = seed_like_model()
        folder = _saved(model, tmp_path / "v")
        assert export_artifact(folder) is True
        assert json.loads((folder / ONNX_INFO).read_text())["block"] is None
        with pytest.raises(OnnxUnavailable, match="no heat maps without gradients"):
            OnnxModel.from_artifact(folder, 32, 32, with_maps=True, threads=1)
        plain = OnnxModel.from_artifact(folder, 32, 32, with_maps=False, threads=1)
        tf_raw = np.asarray(model(batch(), training=False)).reshape(-1)
        assert np.abs(plain.raw(batch()) - tf_raw).max() <= MAX_DIFF

    def test_the_shipped_version_carries_a_graph_that_matches(self) -> None:
        version = SHIPPED / (SHIPPED / "CURRENT").read_text().strip()
        pred = Predictor(SHIPPED, load_model=False)
        pred.use_onnx(with_maps=True, threads=1)
        assert "model.onnx" == pred.onnx_graph and "" == pred.onnx_graph_problem
        assert pred._model is None  # Keras was never asked for
        assert (version / ONNX_FILE).is_file()

    def _run(self, make_config: Callable[..., Config], store: Path) -> tuple[dict[str, dict[str, str]], list]:  # type: ignore[type-arg]
        cfg = make_config(runtime="auto", explain={"enabled": True}, model_store=str(store))
        for path in fixture_images()[:6]:
            shutil.copy(path, cfg.inbox / path.name)
        done = run_once(cfg, timeout=180)
        assert 0 == done.returncode, done.stderr[-2000:]
        for noise in ("cuInit", "absl::InitializeLog"):  # TensorFlow's start-up lines, where it loads
            assert noise not in done.stderr
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        rows = {r["file"]: dict(r) for r in read_rows(cfg.results)}
        assert 6 == len(rows) and all(r["heatmap"] for r in rows.values())
        shutil.rmtree(cfg.results.parent / "processed")
        shutil.rmtree(cfg.results.parent / "heatmaps")
        cfg.results.unlink()
        return rows, events

    def test_the_daemon_serves_the_stored_graph_without_tensorflow(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A real ``run --once``: the shipped version scores and explains from model.onnx with
        TensorFlow never imported; with the graph's record not matching the model it is
        converted as before (a warning says why), with the same rows."""
        store = tmp_path / "store"
        shutil.copytree(SHIPPED, store, ignore=shutil.ignore_patterns("*.png"))
        stored_rows, events = self._run(make_config, store)
        (loaded,) = [e for e in events if e["event"] == "model_loaded"]
        assert ("onnxruntime", "model.onnx", False) == (
            loaded["runtime"],
            loaded["onnx_graph"],
            loaded["tensorflow_loaded"],
        )
        (device,) = [e for e in events if e["event"] == "device"]
        assert ("CPU", "not loaded") == (device["device"], device["tensorflow"])
        version = store / (store / "CURRENT").read_text().strip()
        info = json.loads((version / ONNX_INFO).read_text())
        info["source_sha256"] = "0" * 64
        (version / ONNX_INFO).write_text(json.dumps(info))
        converted_rows, events = self._run(make_config, store)
        (loaded,) = [e for e in events if e["event"] == "model_loaded"]
        assert ("converted at load", True) == (loaded["onnx_graph"], loaded["tensorflow_loaded"])
        (unused,) = [e for e in events if e["event"] == "onnx_graph_unused"]
        assert "warning" == unused["level"] and "another model.keras" in str(unused["reason"])
        assert stored_rows.keys() == converted_rows.keys()
        for name, row in stored_rows.items():
            assert row["label"] == converted_rows[name]["label"]
            assert float(row["probability"]) == pytest.approx(
                float(converted_rows[name]["probability"]), abs=1e-5
            )


def test_onnx_runtime_writes_nothing_under_home(tmp_path: Path) -> None:
    """Importing onnxruntime through watcher.onnxrt leaves $HOME alone (ONNX Runtime 1.32 wrote a
    telemetry device id and event database under ~/.cache/Microsoft/)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORT_")}
    env["HOME"] = str(tmp_path)
    code = "import watcher.onnxrt, onnxruntime; print(onnxruntime.__version__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert 0 == done.returncode, done.stderr
    assert [] == [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
