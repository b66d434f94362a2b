"""Other ways to run the model and decode faster, measured against what the daemon does now.

Usage (from the repo root; reads ../shared, never used by the tests):

    .venv/bin/python benchmarks/runtimes.py [--store model_store] [--version V]

Prints, for the served version (issue 9's "How"):

- **the model's numbers**: on the validation split it was chosen on (``training.split`` in
  metadata.json, rebuilt with ``watcher.splits``), the largest and mean difference of the
  calibrated probability against TensorFlow float32, how many images move by more than 0.01
  and 0.02, labels changed, and ROC AUC / sensitivity / specificity, for
  - TensorFlow with bfloat16 compute (Keras ``mixed_bfloat16``; this CPU's AVX512_BF16),
  - ONNX Runtime float32 (what ``runtime: auto`` serves) and int8 (static QDQ quantisation,
    per channel, calibrated on 256 training images; VNNI);
- **their speed**: CPU ms per image and images/s, batches of 32, alternated three times;
- **heat maps without gradients**: whether the version's Grad-CAM map equals the forward
  class activation map ReLU(sum_k w_k A_k) (true when only max pooling, global average
  pooling and dropout sit between the explained block and the one-unit Dense head), so that
  a runtime without gradients could draw them;
- **decode workers, threads against processes**: decode + preprocess + thumbnail of the 80
  full-resolution originals (x10) on a pool of two, alone and with the model scoring
  batches of 32 in the main thread as the results come.

The adoption rule (issue 9): probabilities within 0.01 of TensorFlow float32 and the
validation metrics unchanged.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from watcher import model_store  # noqa: E402
from watcher.inference import Predictor, calibrate  # noqa: E402

BATCH = 32


def validation_inputs(pred: Predictor, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preprocessed validation images and labels of the version's split, and 256 training images."""
    from watcher.splits import list_samples, split_samples
    from watcher.train import load_images, preprocess_all

    training = pred.metadata.get("training") or pred.metadata.get("weights", {}).get("training", {})
    split_cfg = training.get("split", {})  # a recalibrated version keeps its weights' training record
    samples = list_samples(data)
    split = split_samples(
        samples,
        split_cfg.get("method", "era"),
        split_cfg.get("val_fraction", 0.2),
        split_cfg.get("seed", 1337),
    )
    images, val, _ = load_images([samples[i] for i in split.val])
    rng = np.random.default_rng(0)
    train_images, _, _ = load_images([samples[i] for i in rng.choice(split.train, 256, replace=False)])
    return (
        preprocess_all(images, pred.spec),
        np.array([s.label for s in val]),
        preprocess_all(train_images, pred.spec),
    )


Runner = Callable[[np.ndarray], np.ndarray]  # a batch (n, h, w, 1) -> the network's raw outputs (n,)


def tf_runners(pred: Predictor) -> dict[str, Runner]:
    import keras
    import tensorflow as tf

    model = pred.model
    last = model.layers[-1]

    def to_bf16(layer: Any) -> Any:
        cfg = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            cfg["dtype"] = "float32" if layer is last else "mixed_bfloat16"  # the head stays float32
        return layer.__class__.from_config(cfg)

    bf16 = keras.models.clone_model(model, clone_function=to_bf16)
    bf16.set_weights(model.get_weights())
    spec = tf.TensorSpec((None, pred.spec.height, pred.spec.width, 1), tf.float32)
    f32 = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    fbf = tf.function(lambda x: tf.cast(bf16(x, training=False), tf.float32), input_signature=[spec])
    return {
        "TensorFlow float32 (served)": lambda x: np.asarray(f32(x)).reshape(-1),
        "TensorFlow bfloat16": lambda x: np.asarray(fbf(x)).reshape(-1),
    }


def ort_runners(pred: Predictor, calib: np.ndarray, tmp: Path) -> dict[str, Runner]:
    """ONNX Runtime float32 and int8 sessions of the version's model, or none (with why)."""
    from watcher.onnxrt import OnnxUnavailable, to_onnx

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        graph = to_onnx(pred.model, pred.spec.height, pred.spec.width)  # the daemon's conversion
    except (ImportError, OnnxUnavailable) as exc:
        print(f"ONNX Runtime skipped ({exc})")
        return {}
    f32, pre, int8 = tmp / "model.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    f32.write_bytes(graph)
    quant_pre_process(str(f32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"x": calib[i : i + BATCH]} for i in range(0, len(calib), BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(pre),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = len(os.sched_getaffinity(0))
    out = {}
    for name, path in (("ONNX Runtime float32", f32), ("ONNX Runtime int8", int8)):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out[name] = lambda x, s=sess: np.asarray(s.run(None, {"x": x})[0]).reshape(-1)
    return out


def model_numbers(pred: Predictor, runners: dict[str, Runner], x: np.ndarray, y: np.ndarray) -> None:
    from sklearn.metrics import roc_auc_score

    def served(run: Runner) -> np.ndarray:
        raw = np.concatenate([run(x[i : i + 128]) for i in range(0, len(x), 128)])
        return calibrate(raw, pred.temperature, pred.logit_shift)

    probs = {name: served(run) for name, run in runners.items()}
    ref = probs["TensorFlow float32 (served)"]
    print(f"\nanswers on {len(y)} validation images, against TensorFlow float32:")
    head = f"{'runtime':30s} {'max |dp|':>9s} {'mean':>8s} {'>0.01':>6s} {'>0.02':>6s} {'labels':>7s}"
    print(head + "  AUC / sens / spec")
    for name, p in probs.items():
        d = np.abs(p - ref)
        called = p >= pred.threshold
        changed = int((called != (ref >= pred.threshold)).sum())
        print(
            f"{name:30s} {d.max():9.4f} {d.mean():8.5f} {(d > 0.01).sum():6d} {(d > 0.02).sum():6d} "
            f"{changed:7d}  "
            f"{roc_auc_score(y, p):.4f} / {called[y == 1].mean():.4f} / {(~called[y == 0]).mean():.4f}"
        )
    print(f"\nspeed, batches of {BATCH} (3 alternations; CPU ms per image, images/s):")
    xb = np.ascontiguousarray(x[:BATCH])
    for run in runners.values():
        run(xb)
    for rep in range(3):
        cells = []
        for name, run in runners.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(30):
                run(xb)
            n = 30 * BATCH
            cells.append(
                f"{name} {(time.process_time() - c) / n * 1000:.2f} ms, {n / (time.perf_counter() - t):.0f}/s"
            )
        print(f"  {rep}: " + "; ".join(cells))


def cam_without_gradients(pred: Predictor, x: np.ndarray) -> None:
    import keras

    from watcher.explain import ExplainError, GradCam

    try:
        gc = GradCam(pred.model)
    except ExplainError as exc:
        print(f"\nheat maps: no Grad-CAM for this version ({exc})")
        return
    between = [type(layer).__name__ for layer in pred.model.layers]
    start = [layer.name for layer in pred.model.layers].index(gc.layer_name) + 1
    between = between[start:-1]
    linear = all(name in ("MaxPooling2D", "GlobalAveragePooling2D", "Dropout") for name in between)
    _, maps = gc.predict_and_explain(x, upsample=False)
    acts = keras.Model(pred.model.inputs, pred.model.get_layer(gc.layer_name).output)(x, training=False)
    w = np.asarray(pred.model.layers[-1].kernel).reshape(-1)
    cam = np.maximum(np.einsum("nhwc,c->nhw", np.asarray(acts), w), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    print(
        f"\nheat maps: between {gc.layer_name} and the head: {', '.join(between) or 'nothing'}; "
        f"Grad-CAM against the forward map ReLU(A . w) on {len(x)} validation images: "
        f"max |difference| {float(np.abs(cam - maps).max()):.1e}"
        + ("" if linear else " (not expected to match: the head is not linear in A)")
    )


def _decode_one(path: str, spec_dict: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    from watcher.imaging import PreprocessSpec, decode, input_floor, preprocess
    from watcher.service import thumbnail

    spec = PreprocessSpec.from_dict(spec_dict)
    decoded = decode(Path(path).read_bytes(), min_size=input_floor(spec))
    return preprocess(decoded.image, spec), thumbnail(decoded.image)


def decode_workers(pred: Predictor, originals: Path) -> None:
    files = sorted(str(p) for p in originals.glob("*/*")) * 10
    spec = pred.metadata["preprocessing"]
    pools: dict[str, Executor] = {
        "threads": ThreadPoolExecutor(2),
        "processes": ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")),
    }
    for pool in pools.values():  # imports in the workers
        list(pool.map(_decode_one, files[:8], [spec] * 8))

    def alone(pool: Executor) -> float:
        t = time.perf_counter()
        list(pool.map(_decode_one, files, [spec] * len(files)))
        return len(files) / (time.perf_counter() - t)

    def with_model(pool: Executor) -> float:
        t, batch = time.perf_counter(), []
        for x, _thumb in pool.map(_decode_one, files, [spec] * len(files)):
            batch.append(x)
            if len(batch) == BATCH:
                pred.raw_probabilities(np.stack(batch))
                batch = []
        return len(files) / (time.perf_counter() - t)

    pred.raw_probabilities(np.zeros((BATCH, pred.spec.height, pred.spec.width, 1), np.float32))
    print(f"\ndecode workers (pool of 2, {len(files)} full-resolution files; images/s):")
    for rep in range(3):
        cells = [
            f"{name}: alone {alone(pool):.0f}, with the model {with_model(pool):.0f}"
            for name, pool in pools.items()
        ]
        print(f"  {rep}: " + "; ".join(cells))
    for pool in pools.values():
        pool.shutdown()


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--version", default=None)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray" / "train")
    ap.add_argument("--originals", type=Path, default=ROOT.parent / "shared" / "data" / "fullres")
    args = ap.parse_args()
    pred = Predictor(args.store, args.version or model_store.current_version(args.store))
    print(f"model {pred.version} ({pred.metadata.get('architecture')}), {len(os.sched_getaffinity(0))} cores")
    x, y, calib = validation_inputs(pred, args.data)
    runners = tf_runners(pred)
    with tempfile.TemporaryDirectory() as tmp:
        runners.update(ort_runners(pred, calib, Path(tmp)))
        model_numbers(pred, runners, x, y)
    cam_without_gradients(pred, x[:256])
    decode_workers(pred, args.originals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
