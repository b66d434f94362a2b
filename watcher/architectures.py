"""Network architectures: ``build(arch, spec) -> keras.Model`` and each one's defaults.

- ``seed``: the seed project's CNN, reproduced exactly (150x150x1, five Conv2D 3x3 + max-pool
  blocks 32-64-128-128-128, Flatten, Dropout 0.5, Dense 512, Dense 1 sigmoid; 651,009 parameters).
- ``dsnet`` (default): a compact depthwise-separable CNN trained from scratch: a strided
  stem, four blocks of two 3x3 separable convolutions with batch norm, global average
  pooling, dropout, one sigmoid unit. About 0.18 M parameters, under 1 MB on disk.
- ``tiny``: a few hundred parameters at 32x32, for tests only.

Every model takes ``(height, width, 1)`` float32 in 0..1 and outputs the sigmoid
probability of PNEUMONIA, shape ``(n, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from watcher.imaging import PreprocessSpec

DEFAULT_ARCH = "dsnet"


@dataclass(frozen=True)
class ArchDefaults:
    """Training defaults that belong to an architecture."""

    spec: PreprocessSpec
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    augment: bool
    description: str
    time_budget_s: float | None = None  # training stops (best weights kept) before exceeding this


ARCHS: dict[str, ArchDefaults] = {
    "seed": ArchDefaults(
        spec=PreprocessSpec(150, 150),
        epochs=10,
        batch_size=32,
        learning_rate=1e-3,
        weight_decay=1e-4,
        augment=False,
        description="seed CNN: 5x(Conv2D 3x3 relu + MaxPool) 32-64-128-128-128, Flatten, "
        "Dropout 0.5, Dense 512 relu, Dense 1 sigmoid",
    ),
    "dsnet": ArchDefaults(
        spec=PreprocessSpec(128, 128, equalize="clahe", clahe_tiles=4),
        epochs=30,
        batch_size=32,
        learning_rate=2e-3,
        weight_decay=1e-4,
        augment=True,
        description="depthwise-separable CNN: Conv 3x3/2 stem 32, 4 blocks of 2x SeparableConv 3x3 "
        "+ BN + ReLU + MaxPool (48-96-160-256), GlobalAveragePooling, Dropout 0.3, "
        "Dense 1 sigmoid",
        time_budget_s=1650.0,  # issue 3: the shipped recipe trains in <= 30 min on 2 CPU cores
    ),
    "tiny": ArchDefaults(
        spec=PreprocessSpec(32, 32),
        epochs=1,
        batch_size=8,
        learning_rate=1e-3,
        weight_decay=1e-4,
        augment=True,
        description="test-only: Conv 3x3 8, GlobalAveragePooling, Dense 1 sigmoid",
    ),
}


def defaults(arch: str) -> ArchDefaults:
    """The defaults of a named architecture, or ValueError naming the known ones."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {sorted(ARCHS)})") from None


def build(arch: str, spec: PreprocessSpec | None = None) -> Any:
    """A fresh, uncompiled ``keras.Model`` for ``arch`` taking ``spec``'s input size."""
    import keras
    from keras import layers

    spec = spec or defaults(arch).spec
    inputs = keras.Input(shape=(spec.height, spec.width, 1), name="image")
    if arch == "seed":
        x = inputs
        for filters in (32, 64, 128, 128, 128):
            x = layers.Conv2D(filters, 3, activation="relu")(x)
            x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dropout(0.5)(x)
        x = layers.Dense(512, activation="relu")(x)
        outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    elif arch == "dsnet":
        x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(inputs)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        for filters in (48, 96, 160, 256):
            for _ in range(2):
                x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
                x = layers.BatchNormalization(momentum=0.9)(x)
                x = layers.ReLU()(x)
            x = layers.MaxPooling2D(2)(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.3)(x)
        outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    elif arch == "tiny":
        x = layers.Conv2D(8, 3, activation="relu")(inputs)
        x = layers.GlobalAveragePooling2D()(x)
        outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    else:
        defaults(arch)  # raises with the list of known names
        raise AssertionError("unreachable")
    return keras.Model(inputs, outputs, name=arch)
