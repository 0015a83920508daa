"""Repeated stratified k-fold of the head on cached features: a second accuracy estimate that does not hang on
one test split, and out-of-fold probabilities for every train and validation image.

Each fold's head is the train stage's head (models.build_head and params.yaml `train:`: normalization adapted to
the fold's training images, the same layers, loss, class weights, Adam, batch size, and early stopping on
val_loss with the best weights restored). Early stopping watches a stratified slice of the fold's own training
part, so the held-out fold is never looked at before it is scored.

What differs from the train stage is the loop: Keras' fit() spends most of the time of so small a head on
per-epoch and per-model overhead, paid folds x repeats times here. `FoldTrainer` compiles one epoch once
(the keras.io "training loop from scratch" pattern) and resets the weights and Adam's state for every fold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, ShuffleSplit, StratifiedShuffleSplit

from tlpipe.errors import PipelineError
from tlpipe.scoring import class_probabilities


@dataclass(frozen=True)
class CrossValidation:
    accuracies: list[float]  # one per fold and repeat
    out_of_fold: np.ndarray  # (n, n_classes): each image's probabilities, averaged over the repeats
    best_epochs: list[int]  # per fold and repeat: the epoch whose weights early stopping kept (1-based)

    def summary(self) -> dict[str, float]:
        return {
            "cv_accuracy_mean": round(float(np.mean(self.accuracies)), 6),
            "cv_accuracy_std": round(float(np.std(self.accuracies, ddof=1)), 6),
        }


def fold_shortage(y: np.ndarray, classes: list[str], folds: int) -> str | None:
    """Why `y` cannot be split into `folds` stratified folds, or None when it can."""
    counts = np.bincount(y, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] >= folds:
        return None
    return (
        f"crossval.folds: {folds} folds need at least {folds} images of every class in train+val; "
        f"{classes[smallest]!r} has {counts[smallest]}; lower crossval.folds or add images"
    )


def check_folds(y: np.ndarray, classes: list[str], folds: int) -> None:
    if shortage := fold_shortage(y, classes, folds):
        raise PipelineError(shortage)


def early_stopping_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, stop) positions: stratified when every class can give an image to both, else plain random."""
    n_stop = max(1, round(len(y) * fraction))
    counts = np.bincount(y)
    present = counts[counts > 0]
    stratify = present.min() >= 2 and min(n_stop, len(y) - n_stop) >= len(present)
    splitter = (StratifiedShuffleSplit if stratify else ShuffleSplit)(n_splits=1, test_size=n_stop, random_state=seed)
    return next(splitter.split(np.zeros(len(y)), y))


def folds_of(y: np.ndarray, folds: int, repeats: int, seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    for index, (train, held_out) in enumerate(splitter.split(np.zeros(len(y)), y)):
        yield index // folds, train, held_out


class FoldTrainer:
    """models.head_layers with the head's loss and Adam, one epoch compiled once for every fold.

    It trains on features already normalized by the fold's own Normalization layer: the same function as the
    head, with the normalization (fixed once adapted) applied once instead of at every step.
    """

    def __init__(self, n_features: int, n_classes: int, settings: dict[str, Any]) -> None:
        import keras
        import tensorflow as tf

        from tlpipe.models import head_layers, loss_for

        inputs = keras.Input((n_features,), name="normalized_features")
        self.model = keras.Model(inputs, head_layers(inputs, n_classes, settings["dropout"], settings["hidden_units"]))
        self.binary = n_classes == 2
        self.loss = keras.losses.get(loss_for(n_classes))  # per-image losses
        self.batch_size, self.epochs, self.patience = settings["batch_size"], settings["epochs"], settings["patience"]
        self.optimizer = keras.optimizers.Adam(learning_rate=settings["learning_rate"])
        self.optimizer.build(self.model.trainable_variables)
        self.optimizer_start = [variable.numpy() for variable in self.optimizer.variables]
        features, labels = tf.TensorSpec([None, n_features], tf.float32), tf.TensorSpec([None], tf.float32)
        self.epoch = tf.function(
            self.run_epoch,
            input_signature=[features, labels, labels, features, labels, tf.TensorSpec([2], tf.int32)],
        )

    def image_losses(self, labels: Any, outputs: Any) -> Any:
        return self.loss(labels[:, None] if self.binary else labels, outputs)

    def run_epoch(self, x: Any, y: Any, weights: Any, x_stop: Any, y_stop: Any, seed: Any) -> Any:
        """One shuffled pass in batches, as fit() with class_weight; returns val_loss on the stopping slice."""
        import tensorflow as tf

        order = tf.argsort(tf.random.stateless_uniform(tf.shape(y), seed))
        for start in tf.range(0, tf.shape(y)[0], self.batch_size):
            batch = order[start : start + self.batch_size]
            with tf.GradientTape() as tape:
                losses = self.image_losses(tf.gather(y, batch), self.model(tf.gather(x, batch), training=True))
                # Keras' sum_over_batch_size reduction of sample-weighted losses.
                loss = tf.reduce_sum(losses * tf.gather(weights, batch)) / tf.cast(tf.size(losses), tf.float32)
            variables = self.model.trainable_variables
            self.optimizer.apply(tape.gradient(loss, variables), variables)
        return tf.reduce_mean(self.image_losses(y_stop, self.model(x_stop, training=False)))

    def reset(self, seed: int) -> None:
        """New initial weights (each layer's own initializer) and dropout masks, all seeded by `seed`, and Adam's
        starting state: a fold's head depends on its data and seed alone, not on the folds before it."""
        import keras

        for index, layer in enumerate(self.model.layers):
            if isinstance(layer, keras.layers.Dense):
                kernel = type(layer.kernel_initializer)(
                    **{**layer.kernel_initializer.get_config(), "seed": seed + index}
                )
                layer.kernel.assign(kernel(layer.kernel.shape))
                layer.bias.assign(layer.bias_initializer(layer.bias.shape))
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:  # at rate 0 it draws nothing
                layer.seed_generator.state.assign(np.array([seed + index, 0], dtype=np.int64))
        for variable, value in zip(self.optimizer.variables, self.optimizer_start, strict=True):
            variable.assign(value)

    def fit(
        self, fit: tuple[np.ndarray, np.ndarray, np.ndarray], stop: tuple[np.ndarray, np.ndarray], seed: int
    ) -> list[float]:
        """Train from a fresh start as fit() with EarlyStopping(monitor="val_loss", patience,
        restore_best_weights=True) would (`train.epochs`, `train.patience`); each epoch's val_loss."""
        self.reset(seed)
        x, y, weights = fit
        val_losses: list[float] = []
        best, best_weights, wait = np.inf, self.weights(), 0
        for epoch in range(self.epochs):
            val_losses.append(float(self.epoch(x, y, weights, *stop, np.array([seed, epoch], dtype=np.int32))))
            wait += 1
            if val_losses[-1] < best:
                best, best_weights, wait = val_losses[-1], self.weights(), 0
            elif wait >= self.patience:
                break
        for variable, value in zip(self.model.trainable_variables, best_weights, strict=True):
            variable.assign(value)
        return val_losses

    def weights(self) -> list[np.ndarray]:
        return [variable.numpy() for variable in self.model.trainable_variables]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(x, training=False))


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    train_settings: dict[str, Any],
    crossval: dict[str, int],
    val_fraction: float,
    seed: int,
) -> CrossValidation:
    """Train and score the head on every fold of every repeat (folds seeded by `seed`, fold i's early-stopping
    slice, shuffling and initial weights by `seed + i`)."""
    import keras

    from tlpipe.models import class_weights

    check_folds(y, classes, crossval["folds"])
    n_classes = len(classes)
    trainer = FoldTrainer(x.shape[1], n_classes, train_settings)
    labels = y.astype(np.float32)
    summed = np.zeros((len(y), n_classes))
    accuracies, best_epochs = [], []
    for index, (_, train, held_out) in enumerate(folds_of(y, crossval["folds"], crossval["repeats"], seed)):
        fit_part, stop_part = early_stopping_split(y[train], val_fraction, seed + index)
        fit, stop = train[fit_part], train[stop_part]
        normalization = keras.layers.Normalization()
        normalization.adapt(x[fit])
        z = np.asarray(normalization(x))
        per_class = class_weights(y[fit], n_classes, train_settings["class_weight"]) or {}
        weights = np.array([per_class.get(int(label), 1.0) for label in y[fit]], dtype=np.float32)
        val_losses = trainer.fit((z[fit], labels[fit], weights), (z[stop], labels[stop]), seed + index)
        best_epochs.append(int(np.argmin(val_losses)) + 1)
        probabilities = class_probabilities(trainer.predict(z[held_out]))
        summed[held_out] += probabilities
        accuracies.append(float(np.mean(probabilities.argmax(axis=1) == y[held_out])))
    return CrossValidation(accuracies, summed / crossval["repeats"], best_epochs)
