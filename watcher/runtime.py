"""The machine the model runs on: TensorFlow's log noise and threads, GPU memory, the device event.

``quiet_tensorflow`` must run before TensorFlow is first imported (the CLI calls it right
after reading the config); ``configure_tensorflow`` before the first model is loaded.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from typing import Any

import structlog

log = structlog.get_logger()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a systemd CPUAffinity=)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def quiet_tensorflow(log_level: str) -> None:
    """Keep TensorFlow's C++ start-up messages off the terminal unless the user asks for them.

    On a machine without an NVIDIA device, the only "errors" TensorFlow prints at start-up are
    its failed CUDA probes, so level 3 hides nothing of use; with a GPU, level 2 keeps real
    errors. ``log.level: debug`` shows everything. A value the user set is left alone.
    """
    global _quiet_import
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        _quiet_import = os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("0", "1")
        return
    _quiet_import = log_level != "debug"
    if log_level == "debug":
        level = "0"
    elif has_nvidia_device():
        level = "2"
    else:
        level = "3"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = level
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", level)


_quiet_import = False


def import_tensorflow() -> None:
    """Import TensorFlow and Keras, with their C++ start-up lines kept off stderr unless debugging.

    TensorFlow 2.16+ logs through absl before any logging is set up ("All log messages before
    absl::InitializeLog() ...", its CUDA probes, the oneDNN notice), which no environment
    variable silences; they are printed while the library loads and when it first looks for
    devices. So stderr (fd 2) points at /dev/null for the import and that first device query
    only; a failed import still raises with its Python traceback.
    """
    if not _quiet_import or "tensorflow" in sys.modules:
        import keras
        import tensorflow

        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        import keras  # noqa: F401
        import tensorflow

        tensorflow.config.list_physical_devices()  # the CUDA probe logs "failed call to cuInit" here
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cpu_info(threads: int) -> dict[str, Any]:
    return {"device": "CPU", "cpu": _cpu_model(), "threads": threads}


_configured: dict[str, Any] | None = None


def wants_onnx(setting: str, device: str | None) -> bool:
    """Whether the ``runtime`` config key asks for ONNX Runtime on this ``device`` ("CPU"/"GPU",
    from ``configure_tensorflow``): always for ``onnxruntime``, on a host without GPU for ``auto``."""
    return setting == "onnxruntime" or (setting == "auto" and device == "CPU")


def has_nvidia_device() -> bool:
    """Whether the kernel shows an NVIDIA GPU (``/dev/nvidia0``...): without one TensorFlow
    cannot use a GPU, so there is no need to import it to find out."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def detect_device(threads: int = 0) -> dict[str, Any]:
    """What the model will run on, importing TensorFlow only where a GPU may be there.

    With an NVIDIA device (or TensorFlow already configured) this is ``configure_tensorflow``'s
    answer. Without one, the host is a CPU host for TensorFlow too, and the answer is built
    without importing it (``tensorflow``: "not loaded"); TensorFlow is loaded and configured
    later only if something needs it (``configure_tensorflow``, idempotent).
    """
    if _configured is not None or has_nvidia_device():
        return configure_tensorflow(threads)
    return {"tensorflow": "not loaded", **_cpu_info(threads or usable_cores())}


def configure_tensorflow(threads: int = 0) -> dict[str, Any]:
    """Set TensorFlow's thread pools and GPU memory growth once; returns what the device is.

    ``threads`` 0: every usable core for the operations of one batch (intra-op), and one
    inter-op thread (a batch is a single chain of layers; more only adds contention with the
    decoding threads). GPUs get memory growth, so one daemon does not take the whole card.
    """
    global _configured
    if _configured is not None:
        return _configured
    import_tensorflow()  # its C++ start-up lines (CUDA probes) kept off stderr
    import tensorflow as tf

    n = threads or usable_cores()
    info: dict[str, Any] = {"tensorflow": tf.__version__}
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised (e.g. in tests): keep its pools
        pass
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        names = []
        for gpu in gpus:
            try:
                names.append(str(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)))
            except Exception:  # details are informative only
                names.append(gpu.name)
        info.update(device="GPU", gpus=names)
    else:
        info.update(_cpu_info(n))
    _configured = info
    return info
