"""Serving a Keras model through ONNX Runtime on the CPU: about half TensorFlow's CPU per image.

The model version's ``model.keras`` stays the one record; at load the network is converted in
memory (tf2onnx, under a second) into an ONNX graph whose outputs are the sigmoid and, when
heat maps are wanted, the explained block's activations. The session is only used after its
answers on a probe batch match TensorFlow's (``MAX_DIFF``); anything else raises
``OnnxUnavailable`` and the caller keeps TensorFlow.

A batch runs ``CHUNK_PER_THREAD`` images per intra-op thread at a time: per image, small runs
cost less CPU than one run of 32, whose activations no longer stay in the caches.

Heat maps need no gradients here: where only max pooling, global average pooling and dropout
sit between the explained block and a one-unit Dense head, Grad-CAM's channel weights are the
head's weights divided by the block's grid size, whatever the image (each pooling window
passes its gradient to exactly one position), so the map is ReLU(sum_k w_k A_k) scaled to
peak 1 (``explain.forward_cam``), computed from the block output of the same pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from watcher.explain import CamArray, ExplainError, find_last_conv_block, forward_cam, linear_head_weights
from watcher.runtime import usable_cores

# images per session run and intra-op thread: on one thread (what the daemon gives the model on
# 2 cores) the shipped model took 1.09-1.11 ms of CPU per image in runs of 4 images against
# 1.30-1.38 ms in runs of 32, whose activations no longer stay in the caches
CHUNK_PER_THREAD = 4
MAX_DIFF = 1e-4  # largest difference from TensorFlow's sigmoid on the probe batch
MAX_MAP_DIFF = 1e-3  # and from Grad-CAM's maps (0..1)
OPSET = 17


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


class OnnxModel:
    """One model version as an ONNX Runtime session, with the block output for heat maps."""

    def __init__(self, model: Any, height: int, width: int, with_maps: bool, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxUnavailable(f"onnxruntime is not installed ({exc})") from exc
        import keras

        self.head_weights: npt.NDArray[np.float32] | None = None
        self.grid: tuple[int, int] | None = None
        outputs = [model.output]
        if with_maps:
            try:
                block = find_last_conv_block(model)
                self.head_weights = linear_head_weights(model, block.name)
            except ExplainError as exc:
                raise OnnxUnavailable(f"no heat maps without gradients for this model: {exc}") from exc
            outputs.append(block.output)
        net = keras.Model(model.inputs[0], outputs, name=f"{model.name}_onnx")  # one input, not a list
        graph = to_onnx(net, height, width)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cores()
        self.chunk = CHUNK_PER_THREAD * opts.intra_op_num_threads  # images per session run
        opts.inter_op_num_threads = 1
        # no busy-waiting between operations: the decoding threads need those cycles
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        probe = np.random.default_rng(0).random((4, height, width, 1), dtype=np.float32)
        ours = self.raw(probe)
        theirs = np.asarray(model(probe, training=False), dtype=np.float32).reshape(-1)
        diff = float(np.abs(ours - theirs).max())
        if not diff <= MAX_DIFF:
            raise OnnxUnavailable(f"its answers differ from TensorFlow's by {diff:.2e} on a probe batch")
        if with_maps:
            from watcher.explain import GradCam

            _, ref_maps = GradCam(model, block.name).predict_and_explain(probe, upsample=False)
            _, maps = self._explain(probe)
            diff = float(np.abs(maps - ref_maps).max())
            if not diff <= MAX_MAP_DIFF:
                raise OnnxUnavailable(f"its heat maps differ from Grad-CAM's by {diff:.2e} on a probe batch")
            self.grid = (int(maps.shape[1]), int(maps.shape[2]))

    def _run(self, batch: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        """The session's outputs for a batch, run ``self.chunk`` images at a time."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) <= self.chunk:  # an empty batch too: its outputs have the right shapes
            return list(self._session.run(None, {self._input: batch}))
        runs = [
            self._session.run(None, {self._input: batch[i : i + self.chunk]})
            for i in range(0, len(batch), self.chunk)
        ]
        return [np.concatenate(outs) for outs in zip(*runs, strict=True)]

    def raw(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network's sigmoid outputs ``(n,)`` for a batch ``(n, h, w, 1)``."""
        return np.asarray(self._run(batch)[0], dtype=np.float32).reshape(-1)

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
        prob, acts = self._run(batch)
        return np.asarray(prob, dtype=np.float32).reshape(-1), forward_cam(acts, self.head_weights)
