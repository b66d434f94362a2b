"""Serving a Keras model through ONNX Runtime on the CPU: about half TensorFlow's CPU per image.

The model version's ``model.keras`` stays the record. When a version is published (``train``,
``calibrate``, ``import``), ``export_artifact`` writes beside it the ONNX graph (``model.onnx``,
tf2onnx) whose outputs are the sigmoid and, where heat maps need no gradients, the explained
block's activations, and its record (``model.onnx.json``: the sha256 of both files, the head's
weights, and TensorFlow's answers and Grad-CAM maps on a probe batch). The daemon serves from
that graph without importing TensorFlow (``OnnxModel.from_artifact``: about 8 s and 700 MB less
at start-up on this project's 2-core machine) once this host's answers on the probe batch match
the recorded ones. A version without a graph, or whose graph does not match its model, is
converted in memory at load as before (``OnnxModel(model, ...)``, checked against TensorFlow
itself). Anything else raises ``OnnxUnavailable`` and the caller keeps TensorFlow.

A batch runs ``CHUNK_PER_THREAD`` images per intra-op thread at a time: per image, small runs
cost less CPU than one run of 32, whose activations no longer stay in the caches.

Heat maps need no gradients here: where only max pooling, global average pooling and dropout
sit between the explained block and a one-unit Dense head, Grad-CAM's channel weights are the
head's weights divided by the block's grid size, whatever the image (each pooling window
passes its gradient to exactly one position), so the map is ReLU(sum_k w_k A_k) scaled to
peak 1 (``explain.forward_cam``), computed from the block output of the same pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from watcher.explain import CamArray, ExplainError, find_last_conv_block, forward_cam, linear_head_weights
from watcher.fsutil import atomic_write_bytes
from watcher.model_store import MODEL_FILE
from watcher.runtime import import_tensorflow, usable_cores

log = structlog.get_logger()

# ONNX Runtime (1.32) otherwise writes a device id and an event queue for upload under
# ~/.cache/Microsoft/ at import: nothing of a clinic's leaves with it, and $HOME is read-only
# under the unit (a warning in the journal at every model load)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# images per session run and intra-op thread: on one thread (what the daemon gives the model on
# 2 cores) the shipped model took 1.09-1.11 ms of CPU per image in runs of 4 images against
# 1.30-1.38 ms in runs of 32, whose activations no longer stay in the caches
CHUNK_PER_THREAD = 4
MAX_DIFF = 1e-4  # largest difference from TensorFlow's sigmoid on the probe batch
MAX_MAP_DIFF = 1e-3  # and from Grad-CAM's maps (0..1)
OPSET = 17
ONNX_FILE = "model.onnx"  # a version's graph, exported when it is published
ONNX_INFO = "model.onnx.json"  # what it was made from, its block, and TensorFlow's probe answers
ARTIFACT_FORMAT = 1


class OnnxUnavailable(Exception):
    """ONNX Runtime cannot serve this model here (not installed, conversion failed, answers differ)."""


def to_onnx(net: Any, height: int, width: int) -> bytes:
    """``net`` (a Keras model taking ``(n, height, width, 1)``) as a serialised ONNX graph whose
    input is named ``x``; raises ``OnnxUnavailable`` when tf2onnx is missing or cannot convert it."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise OnnxUnavailable(f"tf2onnx is not installed ({exc})") from exc
    spec = (tf.TensorSpec((None, height, width, 1), tf.float32, name="x"),)
    try:
        proto, _ = tf2onnx.convert.from_function(
            tf.function(lambda x: net(x, training=False)), input_signature=spec, opset=OPSET
        )
    except Exception as exc:  # tf2onnx raises many types for an op it cannot convert
        raise OnnxUnavailable(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    return bytes(proto.SerializeToString())


def export_artifact(folder: Path) -> bool:
    """Write ``model.onnx`` and its record ``model.onnx.json`` beside the ``model.keras`` in
    ``folder`` (a build folder, before it is published), so the daemon can serve the version
    without TensorFlow. Returns False when a pair that matches the model is already there
    (copied with it from another store).

    The graph outputs the sigmoid and, where heat maps need no gradients
    (``linear_head_weights``), the explained block; the record holds the model's sha256, the
    head's weights and TensorFlow's answers and Grad-CAM maps on the probe batch, which every
    later load must reproduce. The pair is loaded back and checked before this returns.
    Raises ``OnnxUnavailable`` when the model cannot be converted (nothing is left behind).
    A copied pair is checked without TensorFlow (as the daemon loads it); TensorFlow is
    imported only to make a graph.
    """
    if _kept(folder):
        return False
    import_tensorflow()  # its C++ start-up lines kept off stderr
    import keras

    try:
        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        raise OnnxUnavailable(f"cannot load {folder / MODEL_FILE}: {exc}") from exc
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[3] != 1 or shape[1] is None or shape[2] is None:
        raise OnnxUnavailable(f"expected a model taking (n, h, w, 1) input, got {shape}")
    height, width = int(shape[1]), int(shape[2])
    try:
        block, head = _explained_block(model)
    except ExplainError:
        block = head = None
    graph = _graph(model, block, height, width)
    prob, maps = _tensorflow_answers(model, block, _probe(height, width))
    info = {
        "format": ARTIFACT_FORMAT,
        "source_sha256": _sha256(folder / MODEL_FILE),
        "onnx_sha256": hashlib.sha256(graph).hexdigest(),
        "opset": OPSET,
        "height": height,
        "width": width,
        "block": None if block is None else block.name,
        "head_weights": None if head is None else [float(v) for v in head],
        "probe": {
            "seed": 0,
            "probabilities": [float(v) for v in prob],
            "maps": None if maps is None else np.asarray(maps, dtype=np.float32).tolist(),
        },
        "made_with": _versions(),
    }
    atomic_write_bytes(folder / ONNX_FILE, graph, mode=0o644)
    atomic_write_bytes(folder / ONNX_INFO, (json.dumps(info, indent=1) + "\n").encode(), mode=0o644)
    try:
        OnnxModel.from_artifact(folder, height, width, with_maps=block is not None, threads=1)
    except OnnxUnavailable:
        for name in (ONNX_FILE, ONNX_INFO):
            (folder / name).unlink(missing_ok=True)
        raise
    return True


def _kept(folder: Path) -> bool:
    """Whether ``folder`` already holds a graph and record that match its model.keras and
    answer as recorded (e.g. copied with the same weights from another version)."""
    try:
        info = json.loads((folder / ONNX_INFO).read_text())
        height, width = int(info["height"]), int(info["width"])
        OnnxModel.from_artifact(folder, height, width, with_maps=False, threads=1)
    except (OSError, ValueError, KeyError, TypeError, OnnxUnavailable):
        return False
    return True


def export_or_explain(folder: Path) -> None:
    """``export_artifact``, logged; a model that cannot be exported is published without a graph
    (the daemon then converts it at each load, as it did before graphs were stored)."""
    try:
        made = export_artifact(folder)
    except OnnxUnavailable as exc:
        log.warning(
            "onnx_export_skipped",
            reason=str(exc),
            consequence="the daemon converts model.keras to ONNX (with TensorFlow) at each load",
        )
        return
    log.info("onnx_exported" if made else "onnx_graph_kept", file=ONNX_FILE)


def _explained_block(model: Any) -> tuple[Any, npt.NDArray[np.float32]]:
    """The block heat maps explain and the head's weights, where the maps need no gradients
    (``linear_head_weights``); raises ``ExplainError`` otherwise."""
    block = find_last_conv_block(model)
    return block, linear_head_weights(model, block.name)


def _graph(model: Any, block: Any, height: int, width: int) -> bytes:
    """The ONNX graph of ``model``: the sigmoid, and ``block``'s output where one is given."""
    import keras

    outputs = [model.output] if block is None else [model.output, block.output]
    net = keras.Model(model.inputs[0], outputs, name=f"{model.name}_onnx")  # one input, not a list
    return to_onnx(net, height, width)


def _tensorflow_answers(
    model: Any, block: Any, probe: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], CamArray | None]:
    """TensorFlow's sigmoid outputs on ``probe``, and Grad-CAM's maps of ``block`` (or None)."""
    prob = np.asarray(model(probe, training=False), dtype=np.float32).reshape(-1)
    if block is None:
        return prob, None
    from watcher.explain import GradCam

    return prob, GradCam(model, block.name).predict_and_explain(probe, upsample=False)[1]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _probe(height: int, width: int) -> npt.NDArray[np.float32]:
    """The probe batch both runtimes must agree on: four fixed random images."""
    return np.random.default_rng(0).random((4, height, width, 1), dtype=np.float32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OnnxModel:
    """One model version as an ONNX Runtime session, with the block output for heat maps.

    Built from a loaded Keras model (``OnnxModel(model, ...)``: converted in memory and checked
    against TensorFlow on the probe batch), or from the version's stored graph
    (``OnnxModel.from_artifact``: checked against TensorFlow's answers recorded when the graph
    was exported, so neither TensorFlow nor Keras is imported).
    """

    def __init__(self, model: Any, height: int, width: int, with_maps: bool, threads: int = 0) -> None:
        self.head_weights: npt.NDArray[np.float32] | None = None
        self.grid: tuple[int, int] | None = None
        block = head_weights = None
        if with_maps:
            try:
                block, head_weights = _explained_block(model)
            except ExplainError as exc:
                raise OnnxUnavailable(f"no heat maps without gradients for this model: {exc}") from exc
        self._open(_graph(model, block, height, width), threads)
        probe = _probe(height, width)
        theirs, ref_maps = _tensorflow_answers(model, block, probe)
        self.head_weights = head_weights
        self._check(probe, theirs, ref_maps, "TensorFlow's")

    @classmethod
    def from_artifact(
        cls, folder: Path, height: int, width: int, with_maps: bool, threads: int = 0
    ) -> OnnxModel:
        """The version in ``folder`` served from its ``model.onnx``, without TensorFlow.

        Raises ``OnnxUnavailable`` (the caller then converts ``model.keras`` as before) when
        the folder has no graph, when the record ``model.onnx.json`` does not match the files
        (another ``model.keras``, a changed or damaged ``model.onnx``), when heat maps are
        wanted and the graph has no block output, or when this host's answers on the probe
        batch differ from TensorFlow's recorded ones.
        """
        graph_path, info_path = folder / ONNX_FILE, folder / ONNX_INFO
        if not graph_path.is_file():
            raise OnnxUnavailable(f"{folder.name} has no {ONNX_FILE}")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, expected an object")
            if info.get("format") != ARTIFACT_FORMAT:
                raise ValueError(f"format {info.get('format')!r}, expected {ARTIFACT_FORMAT}")
            probe_prob = np.asarray(info["probe"]["probabilities"], np.float32)
            probe_maps = info["probe"]["maps"]
            block = info["block"]
            shape = (int(info["height"]), int(info["width"]))
            source, digest = str(info["source_sha256"]), str(info["onnx_sha256"])
            head = None if block is None else np.asarray(info["head_weights"], np.float32)
            ref_maps = None if block is None else np.asarray(probe_maps, np.float32)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OnnxUnavailable(f"{info_path.name} of {folder.name} is unreadable: {exc}") from exc
        if shape != (height, width):
            raise OnnxUnavailable(f"{ONNX_FILE} takes {shape[0]}x{shape[1]}, the version {height}x{width}")
        try:
            made_from_this = _sha256(folder / MODEL_FILE) == source
            graph = graph_path.read_bytes()
        except OSError as exc:  # loading model.keras instead will say what is wrong with it
            raise OnnxUnavailable(f"cannot read {folder.name}'s files: {exc}") from exc
        if not made_from_this:
            raise OnnxUnavailable(f"{ONNX_FILE} of {folder.name} was made from another {MODEL_FILE}")
        if hashlib.sha256(graph).hexdigest() != digest:
            raise OnnxUnavailable(
                f"{ONNX_FILE} of {folder.name} does not match its record (changed or damaged)"
            )
        if with_maps and block is None:
            raise OnnxUnavailable(
                f"no heat maps without gradients for this model ({ONNX_FILE} has no block output)"
            )
        self = cls.__new__(cls)
        self.head_weights, self.grid = head, None
        self._open(graph, threads)
        self._check(_probe(height, width), probe_prob, ref_maps, "TensorFlow's recorded")
        return self

    def _open(self, graph: bytes, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxUnavailable(f"onnxruntime is not installed ({exc})") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cores()
        self.chunk = CHUNK_PER_THREAD * opts.intra_op_num_threads  # images per session run
        opts.inter_op_num_threads = 1
        # no busy-waiting between operations: the decoding threads need those cycles
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for a graph it cannot load
            raise OnnxUnavailable(f"ONNX Runtime cannot load the graph: {type(exc).__name__}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]

    def _check(
        self,
        probe: npt.NDArray[np.float32],
        theirs: npt.NDArray[np.float32],
        their_maps: npt.NDArray[np.float32] | None,
        whose: str,
    ) -> None:
        """Refuse the session unless it answers the probe batch like TensorFlow did."""
        ours = self.raw(probe)
        diff = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
        if not diff <= MAX_DIFF:
            raise OnnxUnavailable(f"its answers differ from {whose} by {diff:.2e} on a probe batch")
        if their_maps is None or self.head_weights is None:
            return
        try:
            _, maps = self._explain(probe)
        except ValueError as exc:  # head weights that do not fit the block (a damaged record)
            raise OnnxUnavailable(f"its head weights do not fit its block output: {exc}") from exc
        diff = float(np.abs(maps - their_maps).max()) if maps.shape == their_maps.shape else float("inf")
        if not diff <= MAX_MAP_DIFF:
            raise OnnxUnavailable(
                f"its heat maps differ from {whose} Grad-CAM by {diff:.2e} on a probe batch"
            )
        self.grid = (int(maps.shape[1]), int(maps.shape[2]))

    def _run(
        self, batch: npt.NDArray[np.float32], outputs: list[str] | None = None
    ) -> list[npt.NDArray[np.float32]]:
        """The session's outputs (all, or those named) for a batch, run ``self.chunk`` images at a time."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) <= self.chunk:  # an empty batch too: its outputs have the right shapes
            return list(self._session.run(outputs, {self._input: batch}))
        runs = [
            self._session.run(outputs, {self._input: batch[i : i + self.chunk]})
            for i in range(0, len(batch), self.chunk)
        ]
        return [np.concatenate(outs) for outs in zip(*runs, strict=True)]

    def raw(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network's sigmoid outputs ``(n,)`` for a batch ``(n, h, w, 1)``."""
        return np.asarray(self._run(batch, self._outputs[:1])[0], dtype=np.float32).reshape(-1)

    def predict_and_explain(
        self, batch: npt.NDArray[np.float32], upsample: bool = False
    ) -> tuple[npt.NDArray[np.float32], CamArray]:
        """Raw probabilities and heat maps on the block's grid, one pass (``GradCam``'s interface)."""
        if self.grid is None:
            raise ExplainError("this session was built without heat maps")
        if upsample:
            raise ExplainError("these maps come on the block's grid: upsample them with explain.upsample_map")
        if len(batch) == 0:
            return np.zeros(0, np.float32), np.zeros((0, *self.grid), np.float32)
        return self._explain(batch)

    def _explain(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], CamArray]:
        """Probabilities and maps of a non-empty batch, on a session built with maps."""
        assert self.head_weights is not None
        prob, acts = self._run(batch, self._outputs[:2])
        return np.asarray(prob, dtype=np.float32).reshape(-1), forward_cam(acts, self.head_weights)
