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
   the fly *before* ``preprocess`` (``watcher.augment``: pose, then acquisition: resolution
   loss, blur, sharpening, gamma, contrast, noise, JPEG re-encoding), so the shared
   preprocessing (e.g. CLAHE) sees augmented images just as it will see images from another
   device at serving time.
3. Fits with balanced class weights, AdamW and cosine learning-rate decay, tracking validation
   ROC AUC each epoch; stops after ``patience`` epochs without improvement or when the time
   budget would be exceeded, and restores the best epoch's weights.
4. Fits the calibration (Platt scaling, class-balanced by default, so probabilities hold for
   a stated prevalence of 0.5) and the operating threshold on validation
   (``watcher.calibration``; nothing is folded into the weights: ``temperature`` and
   ``logit_shift`` go to metadata.json), stores the validation score histogram for the
   drift monitor (``watcher.drift``), writes ``metrics.json`` (with bootstrap 95% intervals
   over patients and ECE), the plots and ``metadata.json`` into a build folder and publishes
   it atomically (``watcher.model_store``).
5. Promotes the new version when asked, when the store has no current version, or when it
   beats the current version's ROC AUC on this run's validation split.
"""

from __future__ import annotations

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

from watcher import __version__, architectures, calibration, drift, evaluation, model_store, onnxrt
from watcher.augment import PROBES, AugmentOptions, augment_grey
from watcher.dicom import DEFAULT_POPULATION
from watcher.errors import DecodeError, ModelStoreError, TrainingError
from watcher.imaging import GreyImage, PreprocessSpec, decode_image, preprocess
from watcher.splits import (
    CLASS_NAMES,
    Sample,
    class_folder_problem,
    count_by_class,
    list_samples,
    split_samples,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
log = structlog.get_logger()

MIN_PATIENTS_PER_CLASS = 3


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
    min_sensitivity: float = 0.97  # threshold floor: see watcher.calibration
    calibration_prior: str = calibration.DEFAULT_PRIOR  # "balanced" (prevalence 0.5) or "validation"
    threshold_rule: str = calibration.DEFAULT_RULE  # "max_specificity" or "youden_floor"
    threshold_margin: float = 0.0  # validation sensitivity asked above min_sensitivity
    n_boot: int = 1000
    verbose: int | None = None  # Keras fit verbosity; None: bar on a TTY, a line per epoch else


# ------------------------------------------------------------ robustness probes


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
    problem = class_folder_problem(data)
    if problem:
        raise TrainingError(f"training folder {problem}")
    for label, cls in enumerate(CLASS_NAMES):
        groups = {s.group for s in samples if s.label == label}
        if len(groups) < MIN_PATIENTS_PER_CLASS:
            raise TrainingError(
                f"{data / cls} has images of {len(groups)} patient(s); at least "
                f"{MIN_PATIENTS_PER_CLASS} per class are needed for a patient-level "
                "validation split"
            )


def threshold_rule_text(rule: str, min_sensitivity: float, margin: float = 0.0) -> str:
    """The threshold rule in words, as stored in metrics.json and metadata.json."""
    floor = f"validation sensitivity >= {min_sensitivity + margin:g}" + (
        f" (floor {min_sensitivity:g} + margin {margin:g})" if margin else ""
    )
    head = "max Youden J" if rule == "youden_floor" else "best specificity"
    return f"{head} subject to {floor}, midpoint to the next lower score"


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

    raw = raw_scores(model)
    cal = calibration.fit_calibration(y_val, raw, opts.calibration_prior)
    temperature, logit_shift = cal.temperature, cal.logit_shift
    probs = cal.apply(raw)
    threshold = calibration.choose_threshold(
        y_val, probs, opts.min_sensitivity, rule=opts.threshold_rule, margin=opts.threshold_margin
    )
    groups = [samples[i].group for i in va]
    report = evaluation.full_report(y_val, probs, threshold, groups, n_boot=opts.n_boot, seed=opts.seed)
    report["uncalibrated"] = {
        "ece": evaluation.expected_calibration_error(y_val, raw),
        "nll": evaluation.nll(y_val, raw),
    }
    report["calibration"] = cal.to_dict()
    report["ece_at_assumed_prevalence"] = evaluation.expected_calibration_error(
        y_val, probs, prevalence=cal.assumed_prevalence
    )
    report["calibrated_nll"] = evaluation.nll(y_val, probs)
    report["temperature"] = temperature
    report["threshold_rule"] = threshold_rule_text(
        opts.threshold_rule, opts.min_sensitivity, opts.threshold_margin
    )
    report["validation_reference"] = drift.reference_from_scores(y_val, probs, threshold)
    report["split"] = split.summary()

    def predict_calibrated(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return cal.apply(np.asarray(model.predict_on_batch(batch)).reshape(-1))

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
        (build / model_store.METRICS_FILE).write_text(model_store.json_text(report) + "\n", encoding="utf-8")
        training_time = time.monotonic() - started
        metadata: dict[str, Any] = {
            "version": None,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "class_names": list(CLASS_NAMES),
            "preprocessing": spec.to_dict(),
            "threshold": threshold,
            "temperature": temperature,
            "logit_shift": logit_shift,
            "calibration": cal.to_dict(),
            "validation_reference": report["validation_reference"],
            "intended_population": dict(DEFAULT_POPULATION),  # what the training data holds
            "trainer_version": __version__,
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

        onnxrt.export_or_explain(build)  # model.onnx: the daemon serves it without TensorFlow
        version = model_store.publish_with_metadata(store, build, metadata)
    except BaseException:
        model_store.remove_build(build)
        raise
    log.info(
        "train_published",
        version=version,
        val=report["metrics"],
        threshold=threshold,
        temperature=temperature,
        logit_shift=logit_shift,
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
