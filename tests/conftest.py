"""Shared fixtures: a tiny real Keras model in a temp store, a temp service layout, real images."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import pytest
import yaml

from watcher import model_store, onnxrt
from watcher.config import Config, load_config
from watcher.imaging import PreprocessSpec

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN_FIXTURES = FIXTURES / "train"
FULLRES = sorted((FIXTURES / "fullres").glob("*.jpeg"))
TINY_SPEC = PreprocessSpec(height=32, width=32)


def build_tiny_model(bias: float = -10.0, weight: float = 20.0, conv: bool = False, heavy: int = 0):  # type: ignore[no-untyped-def]
    """A real Keras model whose output is sigmoid(weight * mean_brightness + bias): bright -> PNEUMONIA.

    ``conv``: the same function through an identity 1x1 convolution first, for Grad-CAM.
    ``heavy``: plus two 3x3 convolutions of that many filters whose result is weighted by zero:
    the same output, only slower (a model that is the pipeline's bottleneck).
    """
    import keras

    inputs = keras.Input((TINY_SPEC.height, TINY_SPEC.width, 1))
    x = inputs
    if conv:
        x = keras.layers.Conv2D(1, 1, kernel_initializer="ones", bias_initializer="zeros")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1)
    logit = dense(x)
    if heavy:
        h = keras.layers.Conv2D(heavy, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.Conv2D(heavy, 3, padding="same")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        logit = keras.layers.Add()([logit, keras.layers.Dense(1, kernel_initializer="zeros")(h)])
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(logit))
    dense.set_weights([np.array([[weight]], dtype="float32"), np.array([bias], dtype="float32")])
    return model


def publish_tiny(
    store: Path,
    bias: float = -10.0,
    threshold: float = 0.5,
    promote: bool = True,
    weight: float = 20.0,
    conv: bool = False,
    heavy: int = 0,
    onnx: bool = True,
) -> str:
    """Publish a tiny model version into ``store`` and (optionally) make it current.

    ``onnx``: with its ONNX graph, as ``train`` publishes, so a daemon serves it without
    loading TensorFlow (8 s of each daemon's start on a slow 2-core machine).
    """
    build = model_store.new_build_dir(store)
    build_tiny_model(bias, weight, conv, heavy).save(build / model_store.MODEL_FILE)
    if onnx:
        onnxrt.export_artifact(build)
    meta = {
        "architecture": "tiny-test",
        "preprocessing": TINY_SPEC.to_dict(),
        "threshold": threshold,
        "temperature": 1.0,
        "class_names": ["NORMAL", "PNEUMONIA"],
    }

    def stamp(version: str) -> None:
        (build / model_store.METADATA_FILE).write_text(json.dumps({**meta, "version": version}))

    (build / model_store.METADATA_FILE).write_text(json.dumps(meta))
    version = model_store.publish(store, build, stamp)
    if promote:
        model_store.set_current(store, version, reason="test")
    return version


@pytest.fixture(scope="session")
def tiny_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one tiny version, built once per test run."""
    store = tmp_path_factory.mktemp("template") / "model_store"
    store.mkdir()
    publish_tiny(store)
    return store


@pytest.fixture
def make_config(tmp_path: Path, tiny_store_template: Path) -> Callable[..., Config]:
    """Write a real config.yaml with real folders under tmp_path; returns a loader."""

    def make(**overrides: object) -> Config:
        root = tmp_path / "svc"
        for name in ("inbox", "processed", "failed"):
            (root / name).mkdir(parents=True, exist_ok=True)
        if not (root / "model_store").exists():
            shutil.copytree(tiny_store_template, root / "model_store")
        raw: dict[str, object] = {
            "inbox": "inbox",
            "processed": "processed",
            "failed": "failed",
            "results": "results.csv",
            "model_store": "model_store",
            "batch": {"max_size": 4, "max_wait_ms": 100},
            "ingest": {"settle_ms": 300, "rescan_interval_s": 2},
            "instance_id": "test",
            "model_poll_s": 0.3,
            "log": {"format": "json"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}  # type: ignore[dict-item]
            else:
                raw[key] = value
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_config(path)

    return make


def fixture_images() -> list[Path]:
    """The committed 224 px fixture images."""
    return sorted(TRAIN_FIXTURES.glob("*/*.jpeg"))
