"""Train a model on a labelled folder and publish it as a new model-store version.

The only module that fits a model. Run it through the CLI::

    xray-watcher train --data ../shared/data/chest_xray/train            # our default arch (dsnet)
    xray-watcher train --data ../shared/data/chest_xray/train --arch seed --epochs 10
    xray-watcher train --data DIR --store model_store --promote

or from Python::

    from pathlib import Path
    from watcher.train import TrainOptions, train
    version = train(TrainOptions(data=Path("../shared/data/chest_xray/train"),
                                 store=Path("model_store")))

What it does, in order:

1. Lists ``DIR/NORMAL`` and ``DIR/PNEUMONIA``, splits them by patient (``watcher.splits``;
   ``era`` by default: the oldest patients of each class are held out for validation).
2. Decodes every image once with ``watcher.imaging.decode_image`` and keeps the grey images in
   memory. Validation images go through ``preprocess`` once; training images are augmented on
   the fly *before* ``preprocess`` (pose, then acquisition: resolution loss, blur, sharpening,
   gamma, contrast, noise, JPEG re-encoding), so the shared preprocessing (e.g. CLAHE) sees
   augmented images just as it will see images from another device at serving time.
3. Fits with balanced class weights, AdamW and cosine learning-rate decay, tracking validation
   ROC AUC each epoch; stops after ``patience`` epochs without improvement or when the time
   budget would be exceeded, and restores the best epoch's weights.
4. Fits a temperature and the operating threshold on validation (``watcher.evaluation``),
   writes ``metrics.json`` (with bootstrap 95% intervals over patients and ECE), the plots and
   ``metadata.json`` into a build folder and publishes it atomically (``watcher.model_store``).
5. Promotes the new version when asked, when the store has no current version, or when it
   beats the current version's ROC AUC on this run's validation split.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import structlog

from watcher import architectures, evaluation, model_store
from watcher.errors import DecodeError, ModelStoreError, TrainingError
from watcher.imaging import GreyImage, PreprocessSpec, decode_image, preprocess
from watcher.splits import CLASS_NAMES, Sample, count_by_class, list_samples, split_samples

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
log = structlog.get_logger()

MIN_PATIENTS_PER_CLASS = 3


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


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``train`` needs; ``None`` means the architecture's default."""

    data: Path
    store: Path = Path("model_store")
    arch: str = architectures.DEFAULT_ARCH
    epochs: int | None = None
    seed: int = 1337
    promote: bool = False
    split: str = "era"
    val_fraction: float = 0.2
    batch_size: int | None = None
    learning_rate: float | None = None
    time_budget_s: float | None = None  # stop before an epoch would end past this; None: arch default
    patience: int = 10
    augment: bool | None = None
    augmentation: AugmentOptions = field(default_factory=AugmentOptions)
    spec: PreprocessSpec | None = None  # override the architecture's preprocessing
    min_sensitivity: float = 0.97  # threshold rule: see watcher.evaluation
    n_boot: int = 1000
    verbose: int | None = None  # Keras fit verbosity; None: bar on a TTY, a line per epoch else


# ------------------------------------------------------------------ augmentation


def _warp(img: GreyImage, angle_deg: float, sx: float, sy: float, shift: tuple[float, float]) -> GreyImage:
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
    out = _warp(out, angle, sx * math.sqrt(ratio), sy / math.sqrt(ratio), shift)
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
    lut = np.arange(256, dtype=np.float64) / 255.0
    if rng.random() < opt.p_gamma:
        lut = lut ** math.exp(rng.uniform(-opt.log_gamma, opt.log_gamma))
    if rng.random() < opt.p_contrast:
        lut = (lut - 0.5) * rng.uniform(*opt.contrast) + 0.5 + rng.uniform(-opt.brightness, opt.brightness)
    out = cv2.LUT(out, np.clip(np.round(lut * 255.0), 0, 255).astype(np.uint8))
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


def _downup(img: GreyImage, f: float) -> GreyImage:
    h, w = img.shape
    small = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)


def _jpeg(img: GreyImage, quality: int) -> GreyImage:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    return img if out is None else np.asarray(out, dtype=np.uint8)


def _lut(img: GreyImage, fn: Any) -> GreyImage:
    table = np.clip(np.round(fn(np.arange(256) / 255.0) * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(cv2.LUT(img, table), dtype=np.uint8)


# name -> (transform of the raw grey image, which classes it is applied to)
PROBES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "lower_resolution_0.5": (lambda im: _downup(im, 0.5), (0, 1)),
    "blur_sigma_1.2": (lambda im: cv2.GaussianBlur(im, (0, 0), 1.2), (0, 1)),
    "jpeg_q30": (lambda im: _jpeg(im, 30), (0, 1)),
    "gamma_0.7": (lambda im: _lut(im, lambda v: v**0.7), (0, 1)),
    "gamma_1.4": (lambda im: _lut(im, lambda v: v**1.4), (0, 1)),
    "contrast_0.7": (lambda im: _lut(im, lambda v: (v - 0.5) * 0.7 + 0.5), (0, 1)),
    # the sharpness shortcut: NORMAL images made as soft as the lower-resolution PNEUMONIA originals
    "normal_only_lower_resolution_0.5": (lambda im: _downup(im, 0.5), (0,)),
    # the aspect shortcut: NORMAL originals are ~1.24 wide:high, PNEUMONIA ~1.57, both squeezed to a
    # square, so NORMAL chests look 1/0.79 wider; here NORMAL images get the PNEUMONIA squeeze
    "normal_only_aspect_0.79": (lambda im: _warp(im, 0.0, 0.79, 1.0, (0.0, 0.0)), (0,)),
    "aspect_0.79": (lambda im: _warp(im, 0.0, 0.79, 1.0, (0.0, 0.0)), (0, 1)),
    # the same relative squeeze without filled borders: stretch vertically (crop top and bottom)
    "normal_only_taller_1.27": (lambda im: _warp(im, 0.0, 1.0, 1.0 / 0.79, (0.0, 0.0)), (0,)),
    "pneumonia_only_wider_1.27": (lambda im: _warp(im, 0.0, 1.0 / 0.79, 1.0, (0.0, 0.0)), (1,)),
}


def robustness_report(
    predict: Any,
    images: Sequence[GreyImage],
    labels: npt.NDArray[np.int64],
    spec: PreprocessSpec,
    threshold: float,
) -> dict[str, dict[str, float]]:
    """Validation metrics at ``threshold`` after fixed acquisition changes (stress tests).

    ``predict`` maps a preprocessed batch to calibrated probabilities. A model that relies on
    sharpness or contrast loses specificity or AUC here; one trained with the matching
    augmentation is expected to hold up, so read these next to the augmentation settings.
    """
    out: dict[str, dict[str, float]] = {}
    for name, (fn, classes) in PROBES.items():
        changed = [fn(img) if int(lab) in classes else img for img, lab in zip(images, labels, strict=True)]
        x = preprocess_all(changed, spec)
        probs = np.concatenate([predict(x[i : i + 128]) for i in range(0, len(x), 128)])
        m = evaluation.binary_metrics(labels, probs, threshold)
        out[name] = {k: round(m[k], 4) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}
    return out


# ------------------------------------------------------------------------ data


def load_images(samples: Sequence[Sample]) -> tuple[list[GreyImage], list[Sample], list[dict[str, str]]]:
    """Decode every sample once; unreadable files are logged and left out."""

    def one(s: Sample) -> GreyImage | str:
        try:
            return decode_image(s.path)
        except DecodeError as exc:
            return str(exc)

    images: list[GreyImage] = []
    kept: list[Sample] = []
    skipped: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for s, img in zip(samples, pool.map(one, samples), strict=True):
            if isinstance(img, str):
                log.warning("train_file_skipped", file=str(s.path), error=img)
                skipped.append({"file": s.path.name, "error": img})
            else:
                images.append(img)
                kept.append(s)
    return images, kept, skipped


def preprocess_all(images: Sequence[GreyImage], spec: PreprocessSpec) -> npt.NDArray[np.float32]:
    """Stack ``preprocess`` of every image: (n, h, w, 1) float32."""
    out = np.empty((len(images), spec.height, spec.width, 1), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess(img, spec)
    return out


def _make_sequence(
    images: Sequence[GreyImage],
    labels: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32],
    spec: PreprocessSpec,
    batch_size: int,
    seed: int,
    augment: bool,
    aug: AugmentOptions,
) -> Any:
    """A ``keras.utils.PyDataset`` of augmented, preprocessed, class-weighted batches."""
    import keras

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=8)
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> npt.NDArray[np.int64]:
            return np.random.default_rng([seed, self.epoch]).permutation(len(images))

        def __len__(self) -> int:
            return math.ceil(len(images) / batch_size)

        def __getitem__(self, idx: int) -> tuple[Any, Any, Any]:
            pick = self.order[idx * batch_size : (idx + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, idx])
            x = np.empty((len(pick), spec.height, spec.width, 1), dtype=np.float32)
            for j, i in enumerate(pick):
                img = augment_grey(images[i], rng, aug, int(labels[i])) if augment else images[i]
                x[j] = preprocess(img, spec)
            return x, labels[pick].astype(np.float32), weights[pick]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return Batches()


# --------------------------------------------------------------------- training


class _BestAndBudget:
    """Factory for the callback tracking the best epoch (val AUC, then val loss) and the budget."""

    @staticmethod
    def make(patience: int, budget_s: float | None, started: float) -> Any:
        import keras

        class Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.best: tuple[float, float] = (-math.inf, -math.inf)
                self.best_epoch = -1
                self.best_weights: list[Any] | None = None
                self.wait = 0
                self.epoch_times: list[float] = []
                self.stop_reason = "epochs done"
                self._t0 = 0.0

            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                self._t0 = time.monotonic()

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                logs = logs or {}
                self.epoch_times.append(time.monotonic() - self._t0)
                auc = float(logs.get("val_auc", float("nan")))
                loss = float(logs.get("val_loss", float("nan")))
                key = (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)
                if key > self.best:
                    self.best, self.best_epoch, self.wait = key, epoch, 0
                    self.best_weights = self.model.get_weights()
                else:
                    self.wait += 1
                log.info(
                    "epoch_done",
                    epoch=epoch + 1,
                    val_auc=round(auc, 4),
                    val_loss=round(loss, 4),
                    best_epoch=self.best_epoch + 1,
                    seconds=round(self.epoch_times[-1], 1),
                )
                if self.wait >= patience:
                    self.stop_reason = f"no val_auc gain for {patience} epochs"
                    self.model.stop_training = True
                elif budget_s is not None:
                    elapsed = time.monotonic() - started
                    if elapsed + max(self.epoch_times) > budget_s:
                        self.stop_reason = f"time budget {budget_s:.0f}s"
                        self.model.stop_training = True

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                if self.best_weights is not None:
                    self.model.set_weights(self.best_weights)

        return Callback()


def _library_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }


def _check_data(data: Path, samples: Sequence[Sample]) -> None:
    missing = [c for c in CLASS_NAMES if not (data / c).is_dir()]
    if not data.is_dir() or missing:
        raise TrainingError(
            f"training folder {data} must hold NORMAL/ and PNEUMONIA/ subfolders; "
            f"missing: {', '.join(missing) if data.is_dir() else 'the folder itself'}"
        )
    for label, cls in enumerate(CLASS_NAMES):
        groups = {s.group for s in samples if s.label == label}
        if len(groups) < MIN_PATIENTS_PER_CLASS:
            raise TrainingError(
                f"{data / cls} has images of {len(groups)} patient(s); at least "
                f"{MIN_PATIENTS_PER_CLASS} per class are needed for a patient-level "
                "validation split"
            )


def _calibrate_model(
    model: Any, y_val: npt.NDArray[np.int64], raw: npt.NDArray[np.float64]
) -> dict[str, Any]:
    """Platt-scale on validation: the logit shift is folded into the output bias, T is returned.

    Falls back to a plain temperature when the model has no final sigmoid Dense layer with a
    bias, or the fitted slope is outside 0.05..20 (a degenerate fit, e.g. on a handful of images).
    """
    a, c = evaluation.fit_platt(y_val, raw)
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if not 0.05 < a < 20 or not getattr(last, "use_bias", False) or activation != "sigmoid":
        t = evaluation.fit_temperature(y_val, raw)
        return {"method": "temperature scaling (NLL on validation)", "temperature": t, "logit_shift": 0.0}
    shift = c / a
    kernel, bias = last.get_weights()
    last.set_weights([kernel, bias + np.float32(shift)])
    return {
        "method": "Platt scaling (NLL on validation): the logit shift is folded into the output "
        "layer's bias, the slope is served as 1 / temperature",
        "temperature": 1.0 / a,
        "logit_shift": shift,
        "platt_a": a,
        "platt_c": c,
    }


def _unshift_model(model: Any, shift: float) -> None:
    """Take a folded logit shift out of the output layer's bias again."""
    if shift:
        kernel, bias = model.layers[-1].get_weights()
        model.layers[-1].set_weights([kernel, bias - np.float32(shift)])


def compare_with_current(
    store: Path,
    new_auc: float,
    val_images: Sequence[GreyImage],
    val_labels: npt.NDArray[np.int64],
    split_summary: dict[str, Any],
) -> dict[str, Any]:
    """Score the current version on this run's validation images."""
    from watcher.inference import Predictor

    try:
        current = model_store.current_version(store)
    except ModelStoreError:
        return {"current": None, "promote": True, "reason": "the store has no current version"}
    try:
        pred = Predictor(store, current)
        x = preprocess_all(val_images, pred.spec)
        probs = np.concatenate([pred.probabilities(x[i : i + 64]) for i in range(0, len(x), 64)])
        cur_auc = evaluation.roc_auc(val_labels, probs)
    except ModelStoreError as exc:
        return {"current": current, "promote": True, "reason": f"current version unusable: {exc}"}
    cur_split = pred.metadata.get("training", {}).get("split", {})
    same_split = all(cur_split.get(k) == split_summary.get(k) for k in ("method", "seed", "val_fraction"))
    better = bool(new_auc > cur_auc)
    return {
        "current": current,
        "current_val_auc": cur_auc,
        "new_val_auc": new_auc,
        "promote": better,
        "current_trained_on_same_split": same_split,
        "reason": (
            f"new val AUC {new_auc:.4f} {'>' if better else '<='} current {current} "
            f"{cur_auc:.4f} on this validation split"
            + (
                ""
                if same_split
                else " (current was trained on a different split, so it may "
                "have seen some of these patients: its score is optimistic)"
            )
        ),
    }


def train(opts: TrainOptions) -> str:
    """Train, evaluate, publish; returns the new version name (e.g. ``'v0002'``)."""
    import keras

    started = time.monotonic()
    arch_def = architectures.defaults(opts.arch)
    spec = opts.spec or arch_def.spec
    epochs = opts.epochs if opts.epochs is not None else arch_def.epochs
    batch_size = opts.batch_size or arch_def.batch_size
    lr = opts.learning_rate or arch_def.learning_rate
    budget = opts.time_budget_s if opts.time_budget_s is not None else arch_def.time_budget_s
    augment = arch_def.augment if opts.augment is None else opts.augment
    if epochs < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    data, store = Path(opts.data), Path(opts.store)
    store.mkdir(parents=True, exist_ok=True)
    samples = list_samples(data) if data.is_dir() else []
    _check_data(data, samples)

    keras.utils.set_random_seed(opts.seed)
    images, samples, skipped = load_images(samples)
    _check_data(data, samples)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    split = split_samples(samples, opts.split, opts.val_fraction, opts.seed)
    tr, va = np.array(split.train, dtype=np.int64), np.array(split.val, dtype=np.int64)
    log.info("train_data", data=str(data), images=len(samples), skipped=len(skipped), split=split.summary())

    n_pos = int(labels[tr].sum())
    n_neg = len(tr) - n_pos
    class_weight = {0: len(tr) / (2.0 * n_neg), 1: len(tr) / (2.0 * n_pos)}
    weights = np.array([class_weight[int(v)] for v in labels], dtype=np.float32)
    train_images = [images[i] for i in tr]
    val_images = [images[i] for i in va]
    x_val = preprocess_all(val_images, spec)
    y_val = labels[va]
    seq = _make_sequence(
        train_images, labels[tr], weights[tr], spec, batch_size, opts.seed, augment, opts.augmentation
    )

    model = architectures.build(opts.arch, spec)
    steps = len(seq) * epochs
    warmup = min(len(seq), steps // 4)
    schedule = keras.optimizers.schedules.CosineDecay(
        lr / 10, decay_steps=max(steps - warmup, 1), alpha=0.02, warmup_target=lr, warmup_steps=warmup
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=arch_def.weight_decay)
    model.compile(
        optimizer=optimizer,
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    tracker = _BestAndBudget.make(opts.patience, budget, started)
    verbose = opts.verbose if opts.verbose is not None else (1 if sys.stdout.isatty() else 2)
    log.info(
        "train_start",
        arch=opts.arch,
        parameters=model.count_params(),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        augment=augment,
        spec=spec.to_dict(),
        class_weight=class_weight,
    )
    history = model.fit(
        seq,
        validation_data=(x_val, y_val.astype(np.float32)),
        epochs=epochs,
        callbacks=[tracker],
        verbose=verbose,
    )
    fit_s = time.monotonic() - started
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}

    def raw_scores(m: Any) -> npt.NDArray[np.float64]:
        return np.concatenate(
            [
                np.asarray(m.predict_on_batch(x_val[i : i + 64]), dtype=np.float64).reshape(-1)
                for i in range(0, len(x_val), 64)
            ]
        )

    raw_before = raw_scores(model)
    calibration = _calibrate_model(model, y_val, raw_before)
    raw = raw_scores(model)
    if abs(evaluation.roc_auc(y_val, raw) - evaluation.roc_auc(y_val, raw_before)) > 1e-6:
        # the shifted outputs saturated in float32 and lost their order: undo, use a temperature
        _unshift_model(model, float(calibration["logit_shift"]))
        calibration = {
            "method": "temperature scaling (NLL on validation); Platt shift undone: it saturated the outputs",
            "temperature": evaluation.fit_temperature(y_val, raw_before),
            "logit_shift": 0.0,
        }
        raw = raw_scores(model)
    temperature = float(calibration["temperature"])
    probs = evaluation.apply_temperature(raw, temperature)
    threshold = evaluation.choose_threshold(y_val, probs, opts.min_sensitivity)
    groups = [samples[i].group for i in va]
    report = evaluation.full_report(y_val, probs, threshold, groups, n_boot=opts.n_boot, seed=opts.seed)
    report["uncalibrated"] = {
        "ece": evaluation.expected_calibration_error(y_val, raw_before),
        "nll": evaluation.nll(y_val, raw_before),
    }
    report["calibration"] = calibration
    report["calibrated_nll"] = evaluation.nll(y_val, probs)
    report["temperature"] = temperature
    report["threshold_rule"] = (
        f"max Youden J subject to validation sensitivity >= {opts.min_sensitivity}, "
        "midpoint to the next lower score"
    )
    report["split"] = split.summary()

    def predict_calibrated(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        raw_b = np.asarray(model.predict_on_batch(batch)).reshape(-1)
        return evaluation.apply_temperature(raw_b, temperature)

    report["robustness"] = robustness_report(predict_calibrated, val_images, y_val, spec, threshold)
    log.info("train_robustness", **{k: v["roc_auc"] for k, v in report["robustness"].items()})
    comparison = compare_with_current(store, report["metrics"]["roc_auc"], val_images, y_val, split.summary())

    build = model_store.new_build_dir(store)
    try:
        clean = architectures.build(opts.arch, spec)  # uncompiled copy: no optimizer state on disk
        clean.set_weights(model.get_weights())
        clean.save(build / model_store.MODEL_FILE)
        evaluation.write_plots(build, y_val, probs, threshold, history=hist)
        report["history"] = hist
        (build / model_store.METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        training_time = time.monotonic() - started
        metadata: dict[str, Any] = {
            "version": None,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "class_names": list(CLASS_NAMES),
            "preprocessing": spec.to_dict(),
            "threshold": threshold,
            "temperature": temperature,
            "calibration": calibration,
            "architecture": opts.arch,
            "architecture_description": arch_def.description,
            "input_shape": [spec.height, spec.width, 1],
            "parameters": int(model.count_params()),
            "training": {
                "data": str(data.resolve()),
                "images": count_by_class(labels.tolist()),
                "train_images": count_by_class(labels[tr].tolist()),
                "val_images": count_by_class(y_val.tolist()),
                "skipped_files": skipped,
                "split": split.summary(),
                "epochs_planned": epochs,
                "epochs_run": len(hist.get("loss", [])),
                "best_epoch": tracker.best_epoch + 1,
                "stop_reason": tracker.stop_reason,
                "patience": opts.patience,
                "time_budget_s": budget,
                "seed": opts.seed,
                "batch_size": batch_size,
                "optimizer": {
                    "name": "AdamW",
                    "learning_rate": lr,
                    "weight_decay": arch_def.weight_decay,
                    "schedule": f"linear warm-up from lr/10 over {warmup} steps, then cosine "
                    f"decay over {steps - warmup} steps to 2% of lr",
                },
                "loss": "binary cross-entropy, balanced class weights",
                "class_weights": {CLASS_NAMES[k]: v for k, v in class_weight.items()},
                "augmentation": asdict(opts.augmentation) if augment else None,
                "early_stopping": "best epoch by validation ROC AUC (ties: lower val loss), weights restored",
                "epoch_seconds": [round(t, 1) for t in tracker.epoch_times],
            },
            "validation": {
                "split": split.method,
                "threshold_rule": report["threshold_rule"],
                **{k: report["metrics"][k] for k in evaluation.METRIC_NAMES},
                "ci95": report["ci95"],
                "uncalibrated_ece": report["uncalibrated"]["ece"],
                "n_images": report["n_images"],
                "n_patients": report["n_patients"],
                "robustness": report["robustness"],
            },
            "promotion": comparison,
            "fit_time_s": round(fit_s, 1),
            "training_time_s": round(training_time, 1),
            "library_versions": _library_versions(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }

        def stamp(version: str) -> None:
            metadata["version"] = version
            (build / model_store.METADATA_FILE).write_text(
                json.dumps(metadata, indent=2) + "\n", encoding="utf-8"
            )

        stamp("unpublished")
        version = model_store.publish(store, build, stamp=stamp)
    except BaseException:
        model_store.remove_build(build)
        raise
    log.info(
        "train_published",
        version=version,
        val=report["metrics"],
        threshold=threshold,
        temperature=temperature,
        training_time_s=round(training_time, 1),
    )
    if opts.promote:
        model_store.set_current(store, version, reason="train --promote")
    elif comparison["promote"]:
        model_store.set_current(store, version, reason=str(comparison["reason"]))
    else:
        log.info("train_not_promoted", version=version, reason=comparison["reason"])
    return version


def options_with(opts: TrainOptions, **changes: Any) -> TrainOptions:
    """A copy of ``opts`` with fields changed (for scripts and tests)."""
    return replace(opts, **changes)
