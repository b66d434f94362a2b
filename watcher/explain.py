"""Grad-CAM heat maps: where in the radiograph the network found evidence for PNEUMONIA.

As in the Keras example "Grad-CAM class activation visualization" (fchollet): a
``keras.Model`` that outputs the last convolutional block's feature maps and the prediction,
one forward pass under ``tf.GradientTape``, channel weights = the mean gradient over the map,
a weighted sum of the channels, ReLU, normalisation to 0..1, bilinear upsampling to the input
size (on the host, and only when asked: the daemon draws the block's own grid onto its thumbnail).

The gradient is that of the PNEUMONIA *logit*, not of the sigmoid output (which saturates:
a confident call would give a near-zero gradient and a noisy map). The map therefore shows
evidence *for* PNEUMONIA whatever the label; for a NORMAL call it is usually weak and
diffuse, and it is normalised per image, so compare maps by shape, not by brightness.

``GradCam.predict_and_explain`` scores and explains in the same pass, so the serving code
need not decode or run the network twice. Drawing is separate: ``overlay_png`` blends a map
onto a grey radiograph and returns PNG bytes; ``write_overlay`` stores them atomically.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from watcher.fsutil import atomic_write_bytes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CamArray = npt.NDArray[np.float32]

# Layers that end a convolutional trunk: after them the maps are no longer spatial.
_CONV_CLASS_NAMES = frozenset({"Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose"})


class ExplainError(ValueError):
    """The model cannot be explained with Grad-CAM (no convolutional layer, odd output)."""


def _is_conv(layer: Any) -> bool:
    """A 2-D convolution of any flavour (checked by class hierarchy, so subclasses count)."""
    return any(cls.__name__ in _CONV_CLASS_NAMES for cls in type(layer).__mro__)


def _output_shape(layer: Any) -> tuple[Any, ...] | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # a layer never called, or called several times
        return None
    return tuple(shape)


def find_last_conv_block(model: Any) -> Any:
    """The layer whose output is the last convolutional block's feature maps.

    That is the last 2-D convolution, followed through the layers right after it that keep
    its spatial size (batch norm, activation): in ``dsnet`` the ReLU after the last separable
    convolution (8x8x256 at 128 px), in ``seed`` the last Conv2D itself (relu built in), never
    the pooling or flattening that follows. Raises ``ExplainError`` when there is no 2-D
    convolution with a 4-D output.
    """
    layers = list(model.layers)
    conv_idx = [i for i, layer in enumerate(layers) if _is_conv(layer)]
    conv_idx = [i for i in conv_idx if (s := _output_shape(layers[i])) is not None and len(s) == 4]
    if not conv_idx:
        kinds = ", ".join(type(layer).__name__ for layer in layers) or "none"
        raise ExplainError(
            f"model {getattr(model, 'name', '?')!r} has no 2-D convolutional layer with a 4-D "
            f"output, which Grad-CAM needs (its layers: {kinds})"
        )
    i = conv_idx[-1]
    chosen = layers[i]
    spatial = _output_shape(chosen)[1:3]  # type: ignore[index]
    for nxt in layers[i + 1 :]:
        shape = _output_shape(nxt)
        try:  # the layers feeding ``nxt``: it must extend this block, not merge a branch
            parents = [t._keras_history[0] for node in nxt._inbound_nodes for t in node.input_tensors]
        except AttributeError:  # pragma: no cover - Keras internals moved: stop at the conv
            parents = []
        if shape is None or len(shape) != 4 or shape[1:3] != spatial or parents != [chosen]:
            break
        chosen = nxt
    return chosen


class GradCam:
    """Grad-CAM for a binary model whose output is the sigmoid probability of PNEUMONIA."""

    def __init__(self, model: Any, layer_name: str | None = None) -> None:
        import keras
        import tensorflow as tf

        self.model = model
        shape = tuple(model.input_shape)
        if len(shape) != 4 or shape[3] != 1 or shape[1] is None or shape[2] is None:
            raise ExplainError(f"expected a model taking (n, h, w, 1) input, got {shape}")
        self.height, self.width = int(shape[1]), int(shape[2])
        conv = model.get_layer(layer_name) if layer_name else find_last_conv_block(model)
        self.layer_name: str = conv.name
        self.grid: tuple[int, int] = tuple(int(d) for d in _output_shape(conv)[1:3])  # type: ignore[index,assignment]

        head = model.layers[-1]
        activation = getattr(head, "activation", None)
        act_name = getattr(activation, "__name__", "")
        if type(head).__name__ == "Dense" and act_name == "sigmoid" and head.units == 1:
            # logit = x @ kernel + bias, computed by hand so its gradient does not saturate
            self._head: Any = head
            outputs = [conv.output, head.input]
            self._mode = "dense"
        elif type(head).__name__ == "Activation" and act_name == "sigmoid":
            self._head = None
            outputs = [conv.output, head.input]
            self._mode = "activation"
        else:
            raise ExplainError(
                f"the last layer of {model.name!r} is {type(head).__name__} "
                f"(activation {act_name or 'none'}); Grad-CAM here needs a one-unit sigmoid Dense "
                "or a sigmoid Activation layer, whose input is the PNEUMONIA logit"
            )
        self.grad_model = keras.Model(model.inputs, outputs, name=f"{model.name}_gradcam")
        spec = tf.TensorSpec([None, self.height, self.width, 1], tf.float32)
        self._explain_fn = tf.function(self._explain_graph, input_signature=[spec])

    def _logit(self, x: Any) -> Any:
        import tensorflow as tf

        if self._mode == "activation":
            return tf.reshape(x, [-1])
        out = tf.matmul(x, self._head.kernel)
        if self._head.use_bias:
            out = out + self._head.bias
        return tf.reshape(out, [-1])

    def _explain_graph(self, batch: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            maps, head_in = self.grad_model(batch, training=False)
            logit = self._logit(head_in)
        # images are independent (no batch statistics at inference), so the gradient of the
        # sum is each image's own gradient
        grads = tape.gradient(logit, maps)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (n, 1, 1, c)
        cam = tf.nn.relu(tf.reduce_sum(maps * weights, axis=-1))  # (n, h', w'): the block's grid
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)  # a flat (all-zero) map stays zero
        cam = tf.where(tf.math.is_finite(cam), cam, tf.zeros_like(cam))  # NaN weights: no evidence
        return tf.sigmoid(logit), tf.clip_by_value(cam, 0.0, 1.0)

    def predict_and_explain(
        self, batch: npt.NDArray[np.float32], upsample: bool = True
    ) -> tuple[npt.NDArray[np.float32], CamArray]:
        """Raw (uncalibrated) probabilities ``(n,)`` and maps in 0..1 with peak 1, one pass.

        The maps come out at the input size ``(n, h, w)`` (bilinear, as in the Keras example),
        or with ``upsample=False`` on the last block's own grid (e.g. 8x8 for dsnet at 128 px):
        the serving path draws them straight onto the display thumbnail (``overlay_png``
        resizes any map), so upsampling to the input size first would be work thrown away.
        """
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 1):
            raise ValueError(
                f"expected a batch of shape (n, {self.height}, {self.width}, 1), got {arr.shape}"
            )
        if len(arr) == 0:
            h, w = (self.height, self.width) if upsample else self.grid
            return np.zeros(0, np.float32), np.zeros((0, h, w), np.float32)
        prob, cam = self._explain_fn(arr)
        maps = np.asarray(cam, dtype=np.float32)
        if upsample:
            maps = np.stack([upsample_map(m, self.height, self.width) for m in maps])
        return np.asarray(prob, dtype=np.float32), maps


# Between the explained block and the head, these keep Grad-CAM's channel weights independent
# of the image (each pooling window passes its gradient to exactly one position, or evenly).
_LINEAR_BETWEEN = frozenset({"MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Dropout"})


def linear_head_weights(model: Any, layer_name: str) -> npt.NDArray[np.float32]:
    """The head's weights, when the map of ``layer_name`` needs no gradient to explain ``model``.

    True for a chain ``block -> [non-overlapping pooling | dropout]* -> global average pooling
    -> [dropout]* -> Dense(1, sigmoid)``: the logit's gradient then sums to the same share of
    ``w_k`` over every channel's map, whatever the image, and Grad-CAM equals
    ``forward_cam(A, w)``. Raises ``ExplainError`` otherwise (a hidden Dense layer, a flatten).
    """
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ExplainError(f"{model.name!r} has no layer {layer_name!r}")
    between = model.layers[names.index(layer_name) + 1 : -1]
    head = model.layers[-1]
    act = getattr(getattr(head, "activation", None), "__name__", "")
    if type(head).__name__ != "Dense" or act != "sigmoid" or head.units != 1:
        raise ExplainError(
            f"the head is {type(head).__name__} ({act or 'no activation'}), not Dense(1, sigmoid)"
        )
    kinds = [type(layer).__name__ for layer in between]
    odd = [k for k in kinds if k not in _LINEAR_BETWEEN]
    if odd or kinds.count("GlobalAveragePooling2D") != 1:
        raise ExplainError(f"between {layer_name!r} and the head: {', '.join(kinds) or 'nothing'}")
    for layer in between:
        pool = getattr(layer, "pool_size", None)
        if pool is not None and tuple(pool) != tuple(layer.strides):
            raise ExplainError(f"{layer.name!r} pools overlapping windows")
    return np.asarray(head.kernel, dtype=np.float32).reshape(-1)


def forward_cam(acts: npt.ArrayLike, weights: npt.NDArray[np.float32]) -> CamArray:
    """Maps ReLU(sum_k w_k A_k), each scaled to peak 1 (an all-zero map stays zero): Grad-CAM
    for a model whose head is linear in the block's output (``linear_head_weights``)."""
    a = np.asarray(acts, dtype=np.float32)
    # einsum's own loop, not BLAS: OpenBLAS's threads spin after a call and took 0.8 ms of CPU
    # per image from the model's threads (measured with ONNX Runtime, batches of 32)
    cam = np.maximum(np.einsum("nhwc,c->nhw", a, np.asarray(weights, dtype=np.float32)), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    cam[~np.isfinite(cam)] = 0.0
    out: CamArray = np.clip(cam, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def upsample_map(cam: npt.NDArray[np.floating[Any]], height: int, width: int) -> CamArray:
    """A map resized (bilinear, half-pixel centres) to ``(height, width)``, scaled to peak 1 again."""
    out: CamArray = np.asarray(
        cv2.resize(np.asarray(cam, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR),
        dtype=np.float32,
    )
    peak = float(out.max()) if out.size else 0.0
    if peak > 0.0:
        out = out * np.float32(1.0 / peak)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


# ------------------------------------------------------------------ drawing


def _text_box(img: npt.NDArray[np.uint8], lines: list[str]) -> None:
    """Print ``lines`` in the top-left corner on a dark box, scaled to the image width."""
    h, w = img.shape[:2]
    scale = max(0.35, min(w, h) / 640.0)
    thick = max(1, round(scale * 1.6))
    font = cv2.FONT_HERSHEY_SIMPLEX
    pad = max(3, round(6 * scale))
    sizes = [cv2.getTextSize(t, font, scale, thick) for t in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + pad
    box_w = min(w, max(s[0][0] for s in sizes) + 2 * pad)
    box_h = min(h, line_h * len(lines) + pad)
    roi = img[:box_h, :box_w]
    roi[:] = cv2.convertScaleAbs(roi, alpha=0.3)  # darken, keep a hint of the image
    y = pad
    for text, ((_, th), base) in zip(lines, sizes, strict=True):
        y += th
        cv2.putText(img, text, (pad, y), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
        y += base + pad


@functools.lru_cache(maxsize=8)
def _blend_tables(max_alpha: float) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Per map level 0..255: the grey image's weight (x255) and the premultiplied colour (RGB)."""
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in [0, 1], got {max_alpha}")
    alpha = np.arange(256, dtype=np.float64) / 255.0 * max_alpha
    inferno = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO)[:, 0, :]
    grey_weight = np.round((1.0 - alpha) * 255.0).astype(np.uint8)
    colour = np.clip(np.round(inferno[:, ::-1] * alpha[:, None]), 0, 255).astype(np.uint8)
    return grey_weight, np.ascontiguousarray(colour.T)  # (3, 256): one table per channel, RGB


def overlay_png(
    image: npt.NDArray[np.uint8],
    cam: npt.NDArray[np.floating[Any]],
    label: str,
    probability: float,
    threshold: float,
    max_alpha: float = 0.6,
    compress: bool = False,
) -> bytes:
    """The radiograph in grey with the map in the 'inferno' colour map blended on, as PNG bytes.

    The map is resized to the image; each pixel's opacity grows with the map's value (up to
    ``max_alpha``), so regions without evidence show the plain radiograph. The label,
    probability and threshold are printed in the top-left corner.

    Stored, not compressed (``stored_png``): deflate and libpng's row filters were most of a
    heat map's cost (1.2-2.4 ms for 72-86 KB at zlib levels 1-6 against 0.16-0.55 ms for 160 KB
    stored, on this project's 2-core machines), and an overlay is small beside the radiograph
    it belongs to. ``compress=True`` (documentation pictures) takes libpng at level 9.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"overlay_png expects a 2-D uint8 image, got {image.dtype} {image.shape}")
    if cam.ndim != 2:
        raise ValueError(f"overlay_png expects a 2-D map, got shape {cam.shape}")
    h, w = image.shape
    src = np.asarray(cam, dtype=np.float32)
    src = np.clip(np.where(np.isfinite(src), src, np.float32(0.0)), 0.0, 1.0)  # NaN: no evidence
    heat = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)  # stays in 0..1
    level = cv2.convertScaleAbs(heat, alpha=255.0)  # 0..255, rounded
    grey_weight, colour = _blend_tables(max_alpha)
    # out = grey * (1 - alpha) + inferno * alpha, alpha = max_alpha * level / 255, from tables
    # indexed by the map's level: OpenCV calls only (no float image, the GIL released), 2x
    # cheaper than a float blend
    grey = cv2.multiply(image, cv2.LUT(level, grey_weight), scale=1.0 / 255.0)
    tint = cv2.merge([cv2.LUT(level, colour[c]) for c in range(3)])
    out = np.asarray(cv2.add(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), tint), dtype=np.uint8)  # RGB
    _text_box(out, [f"{label} {probability:.2f}", f"threshold {threshold:.2f}"])
    if compress:  # documentation pictures: libpng's default filters and zlib level 9
        ok, buf = cv2.imencode(".png", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:  # pragma: no cover - encoding an in-memory uint8 BGR image does not fail
            raise ValueError("PNG encoding failed")
        return bytes(buf.tobytes())
    return stored_png(out)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STORED_BLOCK = 65535  # the most bytes a deflate "stored" block holds


def _png_chunk(kind: bytes, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A PNG chunk as pieces to join: length, type, data (given in pieces), CRC-32 of type and data."""
    crc = zlib.crc32(kind)
    for part in parts:
        crc = zlib.crc32(part, crc)
    size = sum(len(part) for part in parts)
    return [struct.pack(">I", size), kind, *parts, struct.pack(">I", crc)]


def stored_png(rgb: npt.NDArray[np.uint8]) -> bytes:
    """An 8-bit RGB image as PNG bytes, uncompressed: no row filter, deflate "stored" blocks.

    Written here rather than by libpng (``cv2.imencode`` at level 0), whose per-row calls and
    BGR swap took 0.47-0.55 ms for a 256 x 207 overlay on this project's 2-core machine; this
    takes 0.16-0.19 ms for the same 160 KB, most of it the two checksums (CRC-32, Adler-32).
    Any PNG reader decodes it.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"stored_png expects a non-empty (h, w, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.empty((h, 1 + 3 * w), np.uint8)
    rows[:, 0] = 0  # filter type 0 (none) before each row
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    raw = rows.data.cast("B")  # C-contiguous: the rows one after another
    n = len(raw)
    idat: list[bytes | memoryview] = [b"\x78\x01"]  # zlib header: deflate, 32 KB window
    for start in range(0, n, _STORED_BLOCK):
        size = min(_STORED_BLOCK, n - start)
        idat += [struct.pack("<BHH", start + size >= n, size, size ^ 0xFFFF), raw[start : start + size]]
    idat.append(struct.pack(">I", zlib.adler32(raw)))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    pieces = [_PNG_SIGNATURE, *_png_chunk(b"IHDR", [header]), *_png_chunk(b"IDAT", idat)]
    return b"".join([*pieces, *_png_chunk(b"IEND", [])])


def write_overlay(path: Path, png: bytes, durable: bool = True, exclusive: bool = False) -> None:
    """Write PNG bytes so readers see the old file or the new one, never half of one.

    Readable by all (the review page is opened from a share); the parent folders are made.
    ``durable=False`` skips the fsyncs: the daemon writes a heat map per file and treats them
    as derived pictures (results.csv is the record), so a power cut may lose the newest ones,
    but never leaves a half-written one. ``exclusive=True``: FileExistsError rather than
    replace a file of that name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png, mode=0o644, durable=durable, exclusive=exclusive)


def border_mass_fraction(cam: npt.NDArray[np.floating[Any]], border: float = 0.10) -> float:
    """Share of the map's mass in the outer ``border`` of each side (0 for an empty map).

    The 10% border covers 36% of the area, so a flat map scores 0.36 and a map that hugs the
    edges (labels, markers, collimation) scores higher.
    """
    arr = np.asarray(cam, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {arr.shape}")
    if not 0.0 <= border < 0.5:
        raise ValueError(f"border must be in [0, 0.5), got {border}")
    h, w = arr.shape
    total = float(arr.sum())
    if total <= 0.0 or not np.isfinite(total):
        return 0.0
    bh, bw = round(h * border), round(w * border)
    inner = float(arr[bh : h - bh, bw : w - bw].sum())
    return (total - inner) / total
