"""Building, saving and loading Keras models: the classification head and the shipped end-to-end model."""

from __future__ import annotations

import importlib
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.backbones import REGISTRY
from tlpipe.datasets import array_batches
from tlpipe.errors import PipelineError, first_line
from tlpipe.files import atomic_path

if TYPE_CHECKING:
    import keras


def build_head(train_features: np.ndarray, n_classes: int, dropout: float, hidden_units: int) -> keras.Model:
    """Normalization -> head_layers.

    The normalization is adapted to the training features, so one learning rate suits every backbone
    (VGG16's pooled activations are two orders of magnitude larger than MobileNetV2's).
    """
    import keras

    normalization = keras.layers.Normalization(name="feature_normalization")
    normalization.adapt(train_features)
    inputs = keras.Input((train_features.shape[1],), name="features")
    return keras.Model(inputs, head_layers(normalization(inputs), n_classes, dropout, hidden_units), name="head")


def head_layers(x: Any, n_classes: int, dropout: float, hidden_units: int) -> Any:
    """The head after its normalization: Dropout -> [Dense(relu) -> Dropout] -> Dense (sigmoid for 2 classes,
    softmax for more), applied to the Keras tensor `x`."""
    import keras

    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    if n_classes == 2:
        return keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    return keras.layers.Dense(n_classes, activation="softmax", name="head_output")(x)


def class_weights(labels: np.ndarray, n_classes: int, mode: str | None) -> dict[int, float] | None:
    """`balanced`: n / (n_classes * count) per class, so every class weighs the same in the loss."""
    if mode is None:
        return None
    counts = np.bincount(labels, minlength=n_classes)
    return {c: float(len(labels) / (n_classes * count)) for c, count in enumerate(counts) if count}


def loss_for(n_classes: int) -> str:
    return "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"


def save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def load_model(path: Path | str) -> keras.Model:
    """Load a model saved by this project, importing what custom backbones (EfficientNet) need first."""
    for module in sorted({m for backbone in REGISTRY.values() for m in backbone.loader_imports}):
        importlib.import_module(module)
    import keras

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run dvc repro to build it")
    # Keras says `File not found` for any .keras file that is not a zip archive, which misleads.
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise PipelineError(
            f"cannot load {path}: not a .keras archive (damaged or incomplete); rebuild it with dvc repro"
        )
    try:
        return keras.models.load_model(path)
    except Exception as error:  # a damaged archive raises ValueError, KeyError, JSONDecodeError, TypeError, ...
        raise PipelineError(f"cannot load {path}: {first_line(error).rstrip('.')}; rebuild it with dvc repro") from None


# Turning the weights into constants costs a fixed graph conversion per process, more for deeper graphs;
# only this many images or more pay it back (benchmarks/README.md measures both sides).
FREEZE_FROM_IMAGES = 1000


def worth_freezing(n_images: int) -> bool:
    return n_images >= FREEZE_FROM_IMAGES


def inference_function(
    forward: Callable[[Any], Any], input_shape: tuple[int | None, ...], freeze: bool = True
) -> Callable[[Any], Any]:
    """`forward` (float32 batch -> one tensor) compiled once for inference, with the weights as constants
    when `freeze` (see worth_freezing).

    Inside tf.function the model skips model.predict's per-call overhead, and a signature with free
    dimensions keeps a short last batch or a new image size from tracing the graph again. With the variables
    turned into constants, TensorFlow's graph optimiser folds what depends only on the weights and fuses
    convolution, batch norm and activation into single oneDNN kernels: the same outputs, faster (most for
    backbones with many small layers; benchmarks/README.md measures it). The function therefore never sees
    later changes to the weights, and random layers would repeat one draw: inference only.
    """
    import tensorflow as tf

    spec = tf.TensorSpec(input_shape, tf.float32)
    if not freeze:
        traced = tf.function(forward, input_signature=[spec], autograph=False)
        return lambda inputs: traced(tf.convert_to_tensor(inputs, tf.float32))
    constant = frozen_function(forward, spec)
    # The converted function keeps only the flat signature, which takes tensors, not arrays.
    return lambda inputs: constant(tf.convert_to_tensor(inputs, tf.float32))[0]


def frozen_function(forward: Callable[[Any], Any], spec: Any) -> Any:
    """`forward` traced once for inputs of `spec` (a tf.TensorSpec), its variables turned into constants:
    a ConcreteFunction, whose graph is also what tf2onnx converts (tlpipe.export.convert_onnx)."""
    import tensorflow as tf

    # The public tf.compat.v1 freezing works on v1 sessions only; this is its TF2 form, stable since TF 2.2.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # A model call needs no AutoGraph, which cannot even parse a lambda that shares its line with another.
    traced = tf.function(forward, input_signature=[spec], autograph=False)
    return convert_variables_to_constants_v2(traced.get_concrete_function())


def train_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    settings: dict[str, Any],
    seed: int,
    strategy: Any,
    callbacks: list[Any],
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fit a new head on cached features with early stopping on `val` (params.yaml `train:`); (head, history)."""
    import keras

    (x_train, y_train), (x_val, y_val) = train, val
    with strategy.scope():
        head = build_head(x_train, n_classes, settings["dropout"], settings["hidden_units"])
        head.compile(
            optimizer=keras.optimizers.Adam(learning_rate=settings["learning_rate"]),
            loss=loss_for(n_classes),
            metrics=["accuracy"],
            # A whole epoch per call: the head is so small that per-step Python overhead dominates otherwise.
            steps_per_execution=math.ceil(len(x_train) / settings["batch_size"]),
        )
    history = head.fit(
        array_batches(x_train, y_train, settings["batch_size"], shuffle_seed=seed),
        validation_data=array_batches(x_val.astype(np.float32), y_val, settings["batch_size"]),
        epochs=settings["epochs"],
        class_weight=class_weights(y_train, n_classes, settings["class_weight"]),
        shuffle=False,  # the dataset reshuffles itself every epoch (seeded); Keras warns if asked to
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings["patience"], restore_best_weights=True),
            *callbacks,
        ],
    )
    return head, history.history


def best_epoch(history: dict[str, list[float]]) -> str:
    """The epoch early stopping kept, in one line: `N epochs, best epoch B: val_loss ..., val_accuracy ...`."""
    best = int(np.argmin(history["val_loss"]))
    return (
        f"{len(history['loss'])} epochs, best epoch {best + 1}: "
        f"val_loss {history['val_loss'][best]:.4f}, val_accuracy {history['val_accuracy'][best]:.4f}"
    )
