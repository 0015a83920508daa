"""Building, saving and loading Keras models: the classification head and the shipped end-to-end model."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.backbones import REGISTRY
from stages.common import PipelineError, atomic_path

if TYPE_CHECKING:
    import keras


def build_head(train_features: np.ndarray, n_classes: int, dropout: float, hidden_units: int) -> "keras.Model":
    """Normalization -> Dropout -> [Dense(relu) -> Dropout] -> Dense(sigmoid for 2 classes, softmax for more).

    The normalization is adapted to the training features, so one learning rate suits every backbone
    (VGG16's pooled activations are two orders of magnitude larger than MobileNetV2's).
    """
    import keras

    normalization = keras.layers.Normalization(name="feature_normalization")
    normalization.adapt(train_features)
    inputs = keras.Input((train_features.shape[1],), name="features")
    x = normalization(inputs)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    if n_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    else:
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="head_output")(x)
    return keras.Model(inputs, outputs, name="head")


def class_weights(labels: np.ndarray, n_classes: int, mode: str | None) -> dict[int, float] | None:
    """`balanced`: n / (n_classes * count) per class, so every class weighs the same in the loss."""
    if mode is None:
        return None
    counts = np.bincount(labels, minlength=n_classes)
    return {c: float(len(labels) / (n_classes * count)) for c, count in enumerate(counts) if count}


def loss_for(n_classes: int) -> str:
    return "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"


def save_model(model: "keras.Model", path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def load_model(path: Path | str) -> "keras.Model":
    """Load a model saved by this project, importing what custom backbones (EfficientNet) need first."""
    for module in sorted({m for backbone in REGISTRY.values() for m in backbone.loader_imports}):
        importlib.import_module(module)
    import keras

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run dvc repro to build it")
    try:
        return keras.models.load_model(path)
    except (ValueError, OSError) as error:
        raise PipelineError(f"{path} cannot be loaded ({str(error).splitlines()[0]}); rerun dvc repro") from None
