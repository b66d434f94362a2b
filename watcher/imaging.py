"""Pure decode and preprocessing functions: the one pixel contract of training and serving.

``decode_image`` turns file bytes (JPEG, PNG, DICOM) into a 2-D ``uint8`` grey image or
raises ``DecodeError`` in plain words. ``preprocess`` turns such an image into the model's
input (``float32``, shape ``(height, width, 1)``) following a ``PreprocessSpec`` that is
stored in each model version's metadata, so serving cannot drift from training.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from watcher import dicom
from watcher.dicom import DicomInfo
from watcher.errors import DecodeError

GreyImage = npt.NDArray[np.uint8]
ModelInput = npt.NDArray[np.float32]

DEFAULT_MAX_PIXELS = 100_000_000

cv2.setNumThreads(1)  # decoding runs in our own worker threads; nested pools only thrash


@dataclass(frozen=True)
class PreprocessSpec:
    """How a grey image becomes model input; saved as ``preprocessing`` in metadata.json."""

    height: int
    width: int
    scaling: Literal["unit"] = "unit"
    equalize: Literal["none", "clahe"] = "none"
    effective_size: int = 0  # >0: squeeze through this resolution first (hides sharpness)
    clahe_tiles: int = 8  # CLAHE's tile grid per side (v0002 and earlier: 8, the OpenCV default)

    def __post_init__(self) -> None:
        if not 1 <= self.clahe_tiles <= 32:
            raise ValueError(f"clahe_tiles must be 1 to 32, got {self.clahe_tiles}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in metadata.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessSpec:
        """Read the JSON form; unknown fields are an error, not silently dropped."""
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad preprocessing spec {raw!r}: {exc}") from exc


# ---------------------------------------------------------------- decoding


def sniff_format(data: bytes) -> str:
    """Name the container from its magic bytes: 'jpeg', 'png', 'dicom' or 'unknown'."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if dicom.looks_like_dicom(data):  # with the preamble, or a bare data set without one
        return "dicom"
    return "unknown"


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise DecodeError("PNG header is damaged (no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    width, height, _ = _jpeg_frame(data)
    return width, height


def _jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """Width, height and sample precision (bits: 8, or 12/16 for extended/lossless JPEG)."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise DecodeError(f"JPEG header is damaged (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height, data[pos + 4]
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise DecodeError("JPEG header is damaged or truncated (no frame header found)")


def _check_complete(fmt: str, data: bytes) -> None:
    """Reject truncated files that decoders would silently pad with grey."""
    tail = data[-4096:].rstrip(b"\x00\r\n ")
    if fmt == "jpeg" and b"\xff\xd9" not in tail[-1024:]:
        raise DecodeError("JPEG data ends before its end-of-image marker: the file is truncated")
    if fmt == "png" and b"IEND" not in tail[-64:]:
        raise DecodeError("PNG data ends before its IEND chunk: the file is truncated")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            f"image declares {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (decode.max_pixels); refusing to decode a possible decompression bomb"
        )


def to_uint8(pixels: npt.NDArray[Any]) -> GreyImage:
    """Stretch any numeric 2-D array to the full 0..255 range (used for >8-bit data)."""
    arr = pixels.astype(np.float64, copy=False)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DecodeError("image holds non-finite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


_REDUCED = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def jpeg_reduction(width: int, height: int, min_width: int, min_height: int) -> int:
    """The largest libjpeg DCT scaling factor (8, 4, 2 or 1) keeping at least ``min_width`` x ``min_height``.

    libjpeg decodes at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients, which costs a
    fraction of a full decode; the image is then ``ceil(width / r)`` x ``ceil(height / r)``.
    """
    for r in (8, 4, 2):
        if -(-width // r) >= min_width and -(-height // r) >= min_height:
            return r
    return 1


def _decode_reduced_jpeg(buf: npt.NDArray[np.uint8], width: int, height: int, r: int) -> GreyImage | None:
    """A DCT-scaled grey decode, or None where libjpeg cannot (then the caller decodes in full)."""
    img = cv2.imdecode(buf, _REDUCED[r])
    expected = (-(-height // r), -(-width // r))
    if img is None or img.ndim != 2 or img.dtype != np.uint8 or img.shape != expected:
        return None  # e.g. a 12-bit JPEG, or a decoder that does not scale: full decode instead
    return np.ascontiguousarray(img)


def _decode_deep_jpeg(data: bytes, precision: int) -> GreyImage:
    """A 12- or 16-bit JPEG (extended or lossless process) through pylibjpeg's libjpeg, full size."""
    try:
        from pylibjpeg import decode as libjpeg_decode  # type: ignore[attr-defined]

        arr = np.asarray(libjpeg_decode(data))
    except Exception as exc:  # the plugin raises several types for bad streams
        raise DecodeError(f"{precision}-bit JPEG data could not be decoded: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] in (1, 2) else cv2.cvtColor(to_uint8(arr), cv2.COLOR_RGB2GRAY)
    return to_uint8(arr) if arr.dtype != np.uint8 else np.ascontiguousarray(arr)


def _decode_raster(
    data: bytes, fmt: str, max_pixels: int, min_size: tuple[int, int] = (0, 0)
) -> tuple[GreyImage, int, int]:
    """The grey image, and the width and height the file declares.

    ``min_size`` (height, width): a JPEG may be decoded DCT-scaled as long as the result keeps
    at least this size (the service asks for twice the model input on each side).
    """
    precision = 8
    if fmt == "png":
        width, height = _png_size(data)
    else:
        width, height, precision = _jpeg_frame(data)
    _check_pixels(width, height, max_pixels)
    _check_complete(fmt, data)
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg" and precision > 8:  # 12/16-bit JPEG: OpenCV's libjpeg is 8-bit only
        return _decode_deep_jpeg(data, precision), width, height
    if fmt == "jpeg" and min_size[0] > 0 and min_size[1] > 0:
        r = jpeg_reduction(width, height, min_size[1], min_size[0])
        if r > 1:
            reduced = _decode_reduced_jpeg(buf, width, height, r)
            if reduced is not None:
                return reduced, width, height
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DecodeError(f"{fmt.upper()} data could not be decoded (corrupt image data)")
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif channels == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif channels == 2:
            img = img[:, :, 0]
        else:
            raise DecodeError(f"{fmt.upper()} has {channels} channels; expected 1 to 4")
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img), width, height
    return to_uint8(img), width, height


@dataclass(frozen=True)
class Decoded:
    """A decoded file: the grey image, and what a DICOM file said about itself (else ``None``).

    ``width`` and ``height`` are the file's own size, which is larger than ``image`` when a JPEG
    was decoded DCT-scaled.
    """

    image: GreyImage
    dicom: DicomInfo | None = None
    width: int = 0
    height: int = 0

    @property
    def reduced(self) -> bool:
        """Decoded DCT-scaled: the image is smaller than the file's own size."""
        return self.image.shape != (self.height, self.width)


def input_floor(spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest (height, width) a decode may return for ``spec``: twice what preprocess shrinks to."""
    eff = spec.effective_size
    return 2 * max(spec.height, eff), 2 * max(spec.width, eff)


def decode(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    accept_any_body_part: bool = False,
    min_size: tuple[int, int] = (0, 0),
) -> Decoded:
    """Decode JPEG, PNG or DICOM bytes into a ``Decoded``, or raise ``DecodeError``.

    DICOM objects other than chest projection radiographs are refused unless
    ``accept_any_body_part`` (config ``dicom.accept_any_body_part``); see ``watcher.dicom``.
    ``min_size`` (height, width), e.g. ``input_floor(spec)``: a large JPEG is then decoded
    DCT-scaled to no less than this, several times faster; (0, 0) decodes in full.
    """
    if not data:
        raise DecodeError("the file is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt == "unknown":
        head = data[:64]
        if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            raise DecodeError("the file is text, not an image (expected JPEG, PNG or DICOM)")
        raise DecodeError("not a JPEG, PNG or DICOM file (unrecognised leading bytes)")
    info = None
    if fmt == "dicom":
        img, info = dicom.read_dicom(data, max_pixels, accept_any_body_part)
        width, height = (img.shape[1], img.shape[0]) if img.ndim == 2 else (0, 0)
    else:
        img, width, height = _decode_raster(data, fmt, max_pixels, min_size)
    if img.ndim != 2 or img.size == 0:
        raise DecodeError(f"decoded image has unusable shape {img.shape}")
    return Decoded(img, info, width, height)


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> GreyImage:
    """Decode image file bytes into a 2-D uint8 grey image, or raise ``DecodeError``."""
    return decode(data, max_pixels).image


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> GreyImage:
    """Read and decode one image file (the only function here that does I/O)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror or exc}") from exc
    return decode_bytes(data, max_pixels)


# ----------------------------------------------------------- preprocessing


def halve(img: GreyImage) -> GreyImage:
    """Half the size by exact 2x2 averaging (OpenCV's integer-factor area path); an odd last row
    or column is dropped."""
    h, w = img.shape
    half = cv2.resize(img[: h - h % 2, : w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return np.asarray(half, dtype=np.uint8)


def resize(img: GreyImage, height: int, width: int) -> GreyImage:
    """Resize to (height, width): area averaging when shrinking, bilinear when growing.

    An image at least 4x the target on both sides is first halved by exact 2x2 averaging
    until it is not: the same area averaging, and 5x cheaper than OpenCV's one non-integer area
    step from a full-size radiograph (resize and CLAHE to 128 px: 0.7 instead of 3.7 ms per
    image on the 80 full-resolution originals).
    Smaller images (the 224 px training images, a JPEG decoded DCT-scaled to less than 4x the
    input on a side) take the one area step unchanged.
    """
    if img.shape == (height, width):
        return img
    shrinking = img.shape[0] * img.shape[1] >= height * width
    if not shrinking:
        return np.asarray(cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    while img.shape[0] >= 4 * height and img.shape[1] >= 4 * width:
        img = halve(img)
    return np.asarray(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)


def equalize(img: GreyImage, method: str, tiles: int = 8) -> GreyImage:
    """Contrast normalisation: 'none' or 'clahe' (clip 2.0, ``tiles`` x ``tiles`` tiles)."""
    if method == "none":
        return img
    if method == "clahe":
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(tiles, tiles))  # not shared: not thread-safe
        return np.asarray(clahe.apply(img), dtype=np.uint8)
    raise ValueError(f"unknown equalize method {method!r} (expected 'none' or 'clahe')")


def scale_to_unit(img: GreyImage) -> ModelInput:
    """uint8 0..255 -> float32 0..1."""
    return img.astype(np.float32) * np.float32(1.0 / 255.0)


def preprocess(img: GreyImage, spec: PreprocessSpec) -> ModelInput:
    """Grey uint8 image -> model input of shape (height, width, 1), float32 in 0..1."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"preprocess expects a 2-D uint8 image, got {img.dtype} {img.shape}")
    if spec.effective_size > 0:
        img = resize(img, spec.effective_size, spec.effective_size)
    img = resize(img, spec.height, spec.width)
    img = equalize(img, spec.equalize, spec.clahe_tiles)
    if spec.scaling != "unit":
        raise ValueError(f"unknown scaling {spec.scaling!r} (expected 'unit')")
    return scale_to_unit(img)[:, :, np.newaxis]
