"""Building, saving and loading Keras models: the classification head and the shipped end-to-end model.

The head on cached features is one of params.yaml `train.head`:
- `logistic`: a linear probe, as representation-learning papers evaluate frozen features: multinomial
  logistic regression (scikit-learn) on the standardised features, its regularisation chosen by stratified
  k-fold cross-validation of the log loss (`LogisticRegressionCV`), its weights then written into the Keras
  head below (Normalization -> Dropout -> Dense), so that fine-tuning, export and predict take it as they
  take the other (`fit_probe`);
- `keras`: the same layers trained by Adam with early stopping (`train_head`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


# Inverse regularisation strengths the probe's cross-validation chooses from, for standardised features.
PROBE_CS = np.logspace(-4, 2, 13)
PROBE_FOLDS = 5  # at most; fewer where the smallest class has fewer images
PROBE_MAX_ITER = 1000
# The logit a class absent from the probe's training images gets: far enough below any other that its
# softmax probability is 0 (in float32).
ABSENT_CLASS_BIAS = -1e4


@dataclass(frozen=True)
class Probe:
    head: Any  # keras.Model: the fitted Normalization -> Dropout -> Dense head
    c: float  # the inverse regularisation strength cross-validation chose
    folds: int  # of that cross-validation (0: too few images per class to choose; C = 1)
    cv_losses: list[float]  # the cross-validated log loss at each of PROBE_CS (empty without folds)

    def line(self, n_images: int) -> str:
        if not self.folds:
            return f"linear probe on {n_images} images, C = 1 (no class has two images to cross-validate C with)"
        return (
            f"linear probe on {n_images} images, C = {self.c:.3g} (the lowest log loss, "
            f"{min(self.cv_losses):.4f}, of {len(PROBE_CS)} values in {self.folds}-fold cross-validation)"
        )


def probe_folds(y: np.ndarray) -> int:
    """The probe's cross-validation folds: PROBE_FOLDS, or fewer where the smallest class has fewer images
    (at least 2); 0 where no class has two images, so that C cannot be chosen."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if counts.max() < 2:
        return 0
    return int(max(2, min(PROBE_FOLDS, counts.min())))


def fit_probe(
    x: np.ndarray, y: np.ndarray, n_classes: int, dropout: float, class_weight: str | None, seed: int
) -> Probe:
    """Fit the linear probe on (x, y) and return it as a Keras head (build_head with no hidden layer)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    head = build_head(x, n_classes, dropout, hidden_units=0)
    z = np.asarray(head.get_layer("feature_normalization")(x.astype(np.float32)), dtype=np.float64)
    folds = probe_folds(y)
    # One BLAS thread: on matrices this small, more threads cost more than they give (several times, on two
    # cores). A class with fewer images than folds, and lbfgs stopping at max_iter at a weak regularisation of
    # separable data, are expected on small data and change nothing in the choice: not worth a warning.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if folds:
            model = LogisticRegressionCV(
                Cs=PROBE_CS,
                l1_ratios=(0.0,),  # plain L2
                cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                scoring="neg_log_loss",
                max_iter=PROBE_MAX_ITER,
                class_weight=class_weight,
                random_state=seed,
                use_legacy_attributes=False,  # C_ a float, scores_ an array (folds, l1 ratios, Cs)
            ).fit(z, y)
            c = float(model.C_)
            cv_losses = (-model.scores_[:, 0, :].mean(axis=0)).round(6).tolist()
        else:
            model, c = LogisticRegression(max_iter=PROBE_MAX_ITER, class_weight=class_weight).fit(z, y), 1.0
            cv_losses = []
    set_linear_weights(head, model.coef_, model.intercept_, model.classes_, n_classes)
    return Probe(head, c, folds, cv_losses)


def set_linear_weights(
    head: keras.Model, coef: np.ndarray, intercept: np.ndarray, present: np.ndarray, n_classes: int
) -> None:
    """Write scikit-learn's logistic regression (coef_, intercept_ over the classes `present`) into the head's
    output layer: sigmoid for two classes (scikit-learn's one row is the second class's logit), softmax
    otherwise, where a class absent from the training images gets ABSENT_CLASS_BIAS."""
    output = head.get_layer("head_output")
    if n_classes == 2:
        kernel, bias = coef.T, intercept
    else:
        kernel = np.zeros((coef.shape[1], n_classes))
        bias = np.full(n_classes, ABSENT_CLASS_BIAS)
        kernel[:, present], bias[present] = coef.T, intercept
    output.set_weights([kernel.astype(np.float32), np.asarray(bias, dtype=np.float32)])


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
# only this many images or more pay it back (docs/performance.md measures both sides).
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
    backbones with many small layers; docs/performance.md measures it). The function therefore never sees
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
    a ConcreteFunction, whose graph is also what tf2onnx converts (write_onnx)."""
    import tensorflow as tf

    # The public tf.compat.v1 freezing works on v1 sessions only; this is its TF2 form, stable since TF 2.2.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # A model call needs no AutoGraph, which cannot even parse a lambda that shares its line with another.
    traced = tf.function(forward, input_signature=[spec], autograph=False)
    return convert_variables_to_constants_v2(traced.get_concrete_function())


def write_onnx(forward: Callable[[Any], Any], spec: Any, path: Path, input_name: str, output_name: str) -> None:
    """tf2onnx over `forward`'s frozen graph (traced for `spec`, a tf.TensorSpec), its one input and one
    output renamed `input_name` and `output_name`.

    Not Keras' own ONNX export, which hands tf2onnx the live function: a Normalization layer keeps its mean
    and variance as captured tensors, and tf2onnx turns those into extra graph inputs that nobody feeds.
    Freezing first (frozen_function, as for inference) makes them constants.
    """
    import tf2onnx

    frozen = frozen_function(forward, spec)
    (frozen_input,), (frozen_output,) = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[frozen_input],
        output_names=[frozen_output],
        tensors_to_rename={frozen_input: input_name, frozen_output: output_name},
        output_path=str(path),
    )


@contextlib.contextmanager
def quiet_converters() -> Iterator[None]:
    """Silence what the converters print while they work: the MLIR converter's per-op diagnostics go to the
    process's stderr from C++, tf2onnx logs each op it lacks, NumPy warns about aliases. A failure is
    reported by its one-line reason (tlpipe.export.failure_reason) instead."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            os.dup2(devnull.fileno(), 2)
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        logger.setLevel(level)


def train_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    n_classes: int,
    settings: dict[str, Any],
    seed: int,
    strategy: Any,
    callbacks: list[Any],
    epochs: int | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fit a new Keras head on cached features (params.yaml `train:`); (head, history).

    With `val`, early stopping on it decides when to stop (at most `train.epochs`); without, it trains for
    `epochs` (tlpipe.small_data: validation too small to stop on).
    """
    import keras

    x_train, y_train = train
    with strategy.scope():
        head = build_head(x_train, n_classes, settings["dropout"], settings["hidden_units"])
        head.compile(
            optimizer=keras.optimizers.Adam(learning_rate=settings["learning_rate"]),
            loss=loss_for(n_classes),
            metrics=["accuracy"],
            # A whole epoch per call: the head is so small that per-step Python overhead dominates otherwise.
            steps_per_execution=math.ceil(len(x_train) / settings["batch_size"]),
        )
    stopping = []
    if val is not None:
        stopping = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings["patience"], restore_best_weights=True)
        ]
    history = head.fit(
        array_batches(x_train, y_train, settings["batch_size"], shuffle_seed=seed),
        validation_data=None
        if val is None
        else array_batches(val[0].astype(np.float32), val[1], settings["batch_size"]),
        epochs=settings["epochs"] if val is not None else epochs,
        class_weight=class_weights(y_train, n_classes, settings["class_weight"]),
        shuffle=False,  # the dataset reshuffles itself every epoch (seeded); Keras warns if asked to
        verbose=0,
        callbacks=[*stopping, *callbacks],
    )
    return head, history.history


def best_epoch(history: dict[str, list[float]]) -> str:
    """The epoch early stopping kept, in one line: `N epochs, best epoch B: val_loss ..., val_accuracy ...`
    (without validation: `N epochs: loss ..., accuracy ...`)."""
    if "val_loss" not in history:
        return f"{len(history['loss'])} epochs: loss {history['loss'][-1]:.4f}, accuracy {history['accuracy'][-1]:.4f}"
    best = int(np.argmin(history["val_loss"]))
    return (
        f"{len(history['loss'])} epochs, best epoch {best + 1}: "
        f"val_loss {history['val_loss'][best]:.4f}, val_accuracy {history['val_accuracy'][best]:.4f}"
    )
