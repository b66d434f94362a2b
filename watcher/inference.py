"""``Predictor``: one published model version, ready to score batches of model inputs.

Everything that turns the network's output into a result lives here: the temperature
(calibration) and the operating threshold come from the version's metadata.json, so the
daemon, ``predict`` and ``evaluate`` give the same answer for the same file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from watcher import model_store
from watcher.errors import ModelStoreError
from watcher.imaging import ModelInput, PreprocessSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = structlog.get_logger()

POSITIVE = "PNEUMONIA"
NEGATIVE = "NORMAL"
_EPS = 1e-7


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    probability: float
    label: str


def calibrate(
    raw_prob: npt.NDArray[np.floating[Any]], temperature: float, logit_shift: float = 0.0
) -> npt.NDArray[np.float64]:
    """Calibrate sigmoid outputs: sigmoid((logit(p) + logit_shift) / T).

    ``logit_shift`` is metadata.json's top-level ``logit_shift`` (0 when absent: v0001, and
    v0002, whose Platt shift is folded into the output bias).
    """
    p = np.clip(np.asarray(raw_prob, dtype=np.float64), _EPS, 1.0 - _EPS)
    logits = np.log(p) - np.log1p(-p)
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-(logits + logit_shift) / temperature))
    return out


class Predictor:
    """A loaded model version."""

    def __init__(self, store: Path, version: str | None = None, load_model: bool = True) -> None:
        """Read the version's metadata and, unless ``load_model`` is False, its Keras model.

        ``load_model=False`` (the daemon, where it will serve through ONNX Runtime): the Keras
        model, and with it TensorFlow, is loaded only when something asks for ``model``, which
        ``use_onnx`` does only when the version has no usable ``model.onnx``.
        """
        self.store = store
        self.version = version or model_store.current_version(store)
        self.metadata = model_store.read_metadata(store, self.version)
        try:
            self.spec = PreprocessSpec.from_dict(self.metadata["preprocessing"])
            self.threshold = float(self.metadata["threshold"])
            self.temperature = float(self.metadata.get("temperature", 1.0))
            self.logit_shift = float(self.metadata.get("logit_shift", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelStoreError(f"metadata.json of {self.version} is incomplete: {exc}") from exc
        if not 0.0 < self.threshold < 1.0 or self.temperature <= 0 or not np.isfinite(self.logit_shift):
            raise ModelStoreError(
                f"metadata.json of {self.version}: threshold {self.threshold} must be in (0, 1), "
                f"temperature {self.temperature} > 0 and logit_shift {self.logit_shift} finite"
            )
        self._model: Any = None
        self._serve: Any = None
        self.onnx: Any = None  # an onnxrt.OnnxModel once use_onnx() succeeded
        self.onnx_graph = ""  # where it came from: "model.onnx" or "converted at load"
        self.onnx_graph_problem = ""  # why the version's model.onnx was not used
        if load_model:
            self._load_model()

    @property
    def model(self) -> Any:
        """The version's Keras model (loaded, with TensorFlow, on first use)."""
        if self._model is None:
            self._load_model()
        return self._model

    def _load_model(self) -> None:
        from watcher import runtime

        path = self.store / self.version / model_store.MODEL_FILE
        _check_archive(path)  # a damaged file is named as such, before TensorFlow is imported
        runtime.import_tensorflow()  # its start-up lines kept quiet, as the CLI does
        import keras

        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad file
            raise ModelStoreError(f"cannot load {path}: {exc}") from exc
        expected = (self.spec.height, self.spec.width, 1)
        got = tuple(model.input_shape[1:])
        if got != expected:
            raise ModelStoreError(f"{path} takes input {got} but metadata.json describes {expected}")
        self._model = model

    def probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Calibrated pneumonia probabilities for a batch of shape (n, h, w, 1)."""
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        raw = self.raw_probabilities(batch)
        return calibrate(raw, self.temperature, self.logit_shift)

    def raw_probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network's own sigmoid outputs for a batch of shape (n, h, w, 1), uncalibrated.

        One compiled graph for every batch size (the batch dimension is left open), so a lone
        file and a full batch reuse the same graph; no per-call data-adapter overhead.
        """
        if self.onnx is not None:
            return self.onnx.raw(batch)  # type: ignore[no-any-return]
        if self._serve is None:
            import tensorflow as tf

            spec = tf.TensorSpec((None, self.spec.height, self.spec.width, 1), tf.float32)
            model = self.model
            self._serve = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        out = self._serve(np.ascontiguousarray(batch, dtype=np.float32))
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def use_onnx(
        self, with_maps: bool, threads: int = 0, before_conversion: Callable[[], None] | None = None
    ) -> None:
        """Serve through ONNX Runtime from now on (``with_maps``: heat maps from the same pass;
        ``threads``: for one model call, 0 = every usable core).

        Raises ``onnxrt.OnnxUnavailable`` (and TensorFlow keeps serving) when it cannot, or
        when its answers on a probe batch differ from TensorFlow's.

        The version's stored graph (``model.onnx``) is used where it matches the model and
        answers like TensorFlow did when it was exported; else ``model.keras`` is converted
        (which loads TensorFlow; ``before_conversion`` is called first). Why the stored graph
        was not used is kept in ``onnx_graph_problem`` (empty when it was).
        """
        from watcher.onnxrt import ONNX_FILE, OnnxModel, OnnxUnavailable

        h, w = self.spec.height, self.spec.width
        try:
            self.onnx = OnnxModel.from_artifact(self.store / self.version, h, w, with_maps, threads)
            self.onnx_graph, self.onnx_graph_problem = "model.onnx", ""
            return
        except OnnxUnavailable as exc:
            self.onnx_graph_problem = str(exc)
        try:
            _check_archive(self.store / self.version / model_store.MODEL_FILE)
        except ModelStoreError as exc:  # neither file can serve: say both, load no TensorFlow
            problem = self.onnx_graph_problem
            raise ModelStoreError(f"{exc}; its {ONNX_FILE} cannot stand in: {problem}") from exc
        if before_conversion is not None:
            before_conversion()
        self.onnx = OnnxModel(self.model, h, w, with_maps, threads)
        self.onnx_graph = "converted at load"

    def prepare(
        self,
        setting: str,
        device: str | None,
        with_maps: bool,
        threads: int,
        configure_tensorflow: Callable[[], Any],
    ) -> None:
        """Make this version ready to serve as the daemon serves it.

        ``setting`` (the ``runtime`` config key) and ``device`` ("CPU"/"GPU") decide whether
        ONNX Runtime is wanted (``runtime.wants_onnx``): then the version's ``model.onnx``
        where it is usable (TensorFlow never imported), else ``model.keras`` converted at load.
        Otherwise, or where ONNX Runtime cannot serve, TensorFlow, with
        ``configure_tensorflow`` called before it loads the model. Why the stored graph was
        not used is logged (``onnx_graph_unused``, a warning where a graph was there but did
        not match). ``with_maps``: Grad-CAM maps from the same ONNX Runtime pass where the
        model allows it. Raises ``ModelStoreError`` for a model that cannot be loaded.
        """
        from watcher import runtime
        from watcher.onnxrt import ONNX_FILE, OnnxUnavailable

        if runtime.wants_onnx(setting, device):
            try:
                self.use_onnx(with_maps, threads, before_conversion=configure_tensorflow)
            except OnnxUnavailable as exc:
                (log.warning if setting == "onnxruntime" else log.info)(
                    "onnxruntime_unavailable",
                    model_version=self.version,
                    reason=str(exc),
                    serving="tensorflow",
                )
            if self.onnx_graph_problem:  # model.keras loaded instead, and TensorFlow with it
                stored = (self.store / self.version / ONNX_FILE).exists()
                (log.warning if stored else log.info)(
                    "onnx_graph_unused",
                    model_version=self.version,
                    reason=self.onnx_graph_problem,
                    consequence=(
                        "model.keras converted at load (slower start, TensorFlow in memory)"
                        if self.onnx is not None
                        else "TensorFlow serves"
                    ),
                )
        if self.onnx is None:  # TensorFlow serves
            configure_tensorflow()
            _ = self.model  # a model that cannot be loaded fails here, not at the first file

    @property
    def runtime(self) -> str:
        """What answers ``raw_probabilities``: "onnxruntime" or "tensorflow"."""
        return "onnxruntime" if self.onnx is not None else "tensorflow"

    def warm_up(self, batch_size: int) -> float:
        """Build and run the serving graph once (before READY); returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        for n in sorted({1, max(1, batch_size)}):
            self.raw_probabilities(np.zeros((n, self.spec.height, self.spec.width, 1), np.float32))
        return time.perf_counter() - t0

    def label_for(self, probability: float) -> str:
        """The class at this version's operating threshold."""
        return POSITIVE if probability >= self.threshold else NEGATIVE

    def predict(self, inputs: list[ModelInput]) -> list[Prediction]:
        """Score preprocessed images."""
        if not inputs:
            return []
        return self.predictions(self.raw_probabilities(np.stack(inputs).astype(np.float32, copy=False)))

    def predictions(self, raw: npt.NDArray[np.floating[Any]]) -> list[Prediction]:
        """Calibrated probabilities and labels from the network's own outputs (e.g. Grad-CAM's pass)."""
        probs = calibrate(np.asarray(raw).reshape(-1), self.temperature, self.logit_shift)
        return [Prediction(float(p), self.label_for(float(p))) for p in probs]


def _check_archive(path: Path) -> None:
    """Raise ``ModelStoreError`` unless ``path`` is a readable zip archive whose members all pass
    their CRC check (a ``.keras`` file is one): a truncated or damaged model is named as such
    (Keras itself says "File not found" for a file that is there)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise ModelStoreError(f"{path} is missing") from None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ModelStoreError(f"{path} is damaged or not a .keras file ({exc})") from exc
    if bad is not None:
        raise ModelStoreError(f"{path} is damaged: its member {bad} fails its CRC check")


def serving_predictor(
    store: Path, version: str | None = None, with_maps: bool = False, threads: int = 0, setting: str = "auto"
) -> Predictor:
    """A ``Predictor`` that answers as the daemon's does on this host, its model loaded
    (``Predictor.prepare``; ``setting`` is the ``runtime`` config key, "auto" for ``predict``,
    ``evaluate``, ``calibrate`` and ``backfill``). Raises ``ModelStoreError`` for a model that
    cannot be loaded."""
    from watcher import runtime

    predictor = Predictor(store, version, load_model=False)
    device = runtime.detect_device(threads).get("device")
    predictor.prepare(setting, device, with_maps, threads, lambda: runtime.configure_tensorflow(threads))
    return predictor
