"""Augmentation and fixed acquisition changes of grey images (before ``preprocess``).

``augment_grey`` is the on-the-fly training augmentation (``watcher.train``); ``PROBES`` are
fixed changes that imitate another device or export, used as stress tests on validation
(``watcher.train.robustness_report``) and as simulated site shifts
(``scripts/validation_schemes.py``); ``TTA_VARIANTS`` are the fixed variants averaged by
test-time augmentation (``tta_probabilities``), an option measured there, not served.
All are pure functions: grey ``uint8`` image in, same-size grey ``uint8`` image out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from watcher.imaging import GreyImage


@dataclass(frozen=True)
class AugmentOptions:
    """Probabilities and ranges of the on-the-fly augmentation (applied before ``preprocess``)."""

    rotate_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.12)
    shift: float = 0.06  # fraction of the image side
    aspect: float = 1.15  # max random width:height stretch factor (1 = off)
    p_class_aspect: float = 0.5  # see augment_grey: de-correlates apparent chest width from the class
    class_aspect: float = 0.79  # PNEUMONIA/NORMAL width squeeze (fullres medians 1.24 vs 1.57 w:h)
    p_downup: float = 0.5  # squeeze through a lower resolution and back
    downup: tuple[float, float] = (0.3, 0.85)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.4, 1.5)
    p_sharpen: float = 0.25
    sharpen: tuple[float, float] = (0.3, 1.0)
    p_gamma: float = 0.5
    log_gamma: float = 0.4
    p_contrast: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.08
    p_noise: float = 0.2
    noise_std: tuple[float, float] = (1.0, 5.0)  # grey levels
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (25, 90)
    hflip: bool = False  # anatomy is not mirror-symmetric (heart, markers): off


def warp(img: GreyImage, angle_deg: float, sx: float, sy: float, shift: tuple[float, float]) -> GreyImage:
    """Rotate and scale (separately along x and y) about the centre, then shift; reflect at borders."""
    h, w = img.shape
    a = math.radians(angle_deg)
    lin = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) @ np.diag([sx, sy])
    centre = np.array([w / 2.0, h / 2.0])
    offset = centre - lin @ centre + np.asarray(shift)
    mat = np.hstack([lin, offset[:, None]])
    out = cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return np.asarray(out, dtype=np.uint8)


def augment_grey(img: GreyImage, rng: np.random.Generator, opt: AugmentOptions, label: int = -1) -> GreyImage:
    """One random augmentation of a grey uint8 image (same size out).

    ``label`` (0 NORMAL, 1 PNEUMONIA) enables the class-balancing aspect change: with
    probability ``p_class_aspect`` a NORMAL image gets the horizontal squeeze typical of
    PNEUMONIA originals and a PNEUMONIA image the inverse stretch, so that in training the
    apparent chest width says nothing about the class.
    """
    h, w = img.shape
    out: npt.NDArray[Any] = img
    # pose: rotation, zoom, shift in one affine warp
    angle = rng.uniform(-opt.rotate_deg, opt.rotate_deg)
    scale = rng.uniform(*opt.scale)
    ratio = math.exp(rng.uniform(-math.log(opt.aspect), math.log(opt.aspect))) if opt.aspect > 1 else 1.0
    sx = sy = scale
    if label in (0, 1) and rng.random() < opt.p_class_aspect:
        # always a zoom-in (crop) along one axis, never a squeeze with filled borders: a
        # class-specific border pattern would be a new shortcut (seen in validation probes)
        if label == 0:
            sy /= opt.class_aspect  # taller: the chest looks as narrow as in PNEUMONIA originals
        else:
            sx /= opt.class_aspect  # wider: as in NORMAL originals
    shift = (rng.uniform(-opt.shift, opt.shift) * w, rng.uniform(-opt.shift, opt.shift) * h)
    out = warp(out, angle, sx * math.sqrt(ratio), sy / math.sqrt(ratio), shift)
    if opt.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    # acquisition: resolution, blur / sharpness
    if rng.random() < opt.p_downup:
        f = rng.uniform(*opt.downup)
        small = cv2.resize(out, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
        interp = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC
        out = cv2.resize(small, (w, h), interpolation=interp)
    if rng.random() < opt.p_blur:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(*opt.blur_sigma))
    elif rng.random() < opt.p_sharpen:
        soft = cv2.GaussianBlur(out, (0, 0), 1.0)
        out = cv2.addWeighted(out, 1.0 + (a := rng.uniform(*opt.sharpen)), soft, -a, 0)
    # intensity: gamma, contrast, brightness (one lookup table)
    table = np.arange(256, dtype=np.float64) / 255.0
    if rng.random() < opt.p_gamma:
        table = table ** math.exp(rng.uniform(-opt.log_gamma, opt.log_gamma))
    if rng.random() < opt.p_contrast:
        gain = rng.uniform(*opt.contrast)  # drawn before the offset, as before (same random stream)
        table = (table - 0.5) * gain + 0.5 + rng.uniform(-opt.brightness, opt.brightness)
    out = cv2.LUT(out, np.clip(np.round(table * 255.0), 0, 255).astype(np.uint8))
    if rng.random() < opt.p_noise:
        sigma = rng.uniform(*opt.noise_std)
        noisy = out.astype(np.float32) + rng.normal(0.0, sigma, out.shape).astype(np.float32)
        out = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if rng.random() < opt.p_jpeg:
        quality = int(rng.integers(opt.jpeg_quality[0], opt.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
        if decoded is not None:
            out = decoded
    return np.ascontiguousarray(out, dtype=np.uint8)


# ------------------------------------------------------------ robustness probes


def downup(img: GreyImage, f: float) -> GreyImage:
    """Area-resample to ``f`` times the size and bilinear back: a lower-resolution acquisition."""
    h, w = img.shape
    small = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)


def jpeg(img: GreyImage, quality: int) -> GreyImage:
    """Re-encode as JPEG at ``quality`` (the input back if encoding fails)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    return img if out is None else np.asarray(out, dtype=np.uint8)


def lut(img: GreyImage, fn: Any) -> GreyImage:
    """Apply an intensity curve ``fn`` on 0..1 through a 256-entry lookup table."""
    table = np.clip(np.round(fn(np.arange(256) / 255.0) * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(cv2.LUT(img, table), dtype=np.uint8)


# name -> (transform of the raw grey image, which classes it is applied to)
PROBES: dict[str, tuple[Callable[[GreyImage], GreyImage], tuple[int, ...]]] = {
    "lower_resolution_0.5": (lambda im: downup(im, 0.5), (0, 1)),
    "blur_sigma_1.2": (lambda im: np.asarray(cv2.GaussianBlur(im, (0, 0), 1.2), dtype=np.uint8), (0, 1)),
    "jpeg_q30": (lambda im: jpeg(im, 30), (0, 1)),
    "gamma_0.7": (lambda im: lut(im, lambda v: v**0.7), (0, 1)),
    "gamma_1.4": (lambda im: lut(im, lambda v: v**1.4), (0, 1)),
    "contrast_0.7": (lambda im: lut(im, lambda v: (v - 0.5) * 0.7 + 0.5), (0, 1)),
    # the sharpness shortcut: NORMAL images made as soft as the lower-resolution PNEUMONIA originals
    "normal_only_lower_resolution_0.5": (lambda im: downup(im, 0.5), (0,)),
    # the aspect shortcut: NORMAL originals are ~1.24 wide:high, PNEUMONIA ~1.57, both squeezed to a
    # square, so NORMAL chests look 1/0.79 wider; here NORMAL images get the PNEUMONIA squeeze
    "normal_only_aspect_0.79": (lambda im: warp(im, 0.0, 0.79, 1.0, (0.0, 0.0)), (0,)),
    "aspect_0.79": (lambda im: warp(im, 0.0, 0.79, 1.0, (0.0, 0.0)), (0, 1)),
    # the same relative squeeze without filled borders: stretch vertically (crop top and bottom)
    "normal_only_taller_1.27": (lambda im: warp(im, 0.0, 1.0, 1.0 / 0.79, (0.0, 0.0)), (0,)),
    "pneumonia_only_wider_1.27": (lambda im: warp(im, 0.0, 1.0 / 0.79, 1.0, (0.0, 0.0)), (1,)),
}


# fixed acquisition variants for test-time augmentation (identity first)
TTA_VARIANTS: dict[str, Callable[[GreyImage], GreyImage]] = {
    "identity": lambda im: im,
    "gamma_0.8": lambda im: lut(im, lambda v: v**0.8),
    "gamma_1.25": lambda im: lut(im, lambda v: v**1.25),
    "lower_resolution_0.6": lambda im: downup(im, 0.6),
}


def tta_probabilities(
    predict: Callable[[Sequence[GreyImage]], npt.NDArray[np.float64]],
    images: Sequence[GreyImage],
    variants: Sequence[str] = tuple(TTA_VARIANTS),
) -> npt.NDArray[np.float64]:
    """Mean logit over fixed variants, as a probability; ``predict`` maps grey images to probabilities."""
    eps = 1e-7
    total = np.zeros(len(images), dtype=np.float64)
    for name in variants:
        fn = TTA_VARIANTS[name]
        p = np.clip(np.asarray(predict([fn(im) for im in images]), dtype=np.float64), eps, 1 - eps)
        total += np.log(p) - np.log1p(-p)
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-total / len(variants)))
    return out
