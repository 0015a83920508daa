"""Repeated stratified k-fold of the head on cached features: a second accuracy estimate that does not hang on
one test split, and out-of-fold probabilities for every train and validation image.

The folds adapt to small classes (`fold_plan`): `crossval.folds`, or as many as the smallest class has
images, down to 2; a class with a single train+val image cannot be held out and trained on both, so it is
left out of the folds and named.

Each fold's head is the train stage's head (params.yaml `train.head`). The linear probe is fitted as the
train stage fits it (tlpipe.models.fit_probe, its regularisation chosen by cross-validation inside the fold's
training part). The Keras head is models.build_head with params.yaml `train:` (normalization adapted to the
fold's training images, the same layers, loss, class weights, Adam, batch size, and early stopping on
val_loss with the best weights restored); early stopping watches a stratified slice of the fold's own
training part, so the held-out fold is never looked at before it is scored. The epochs it kept are what the
train stage trains for where validation is too small to stop on (tlpipe.small_data).

What differs from the train stage is the loop: Keras' fit() spends most of the time of so small a head on
per-epoch and per-model overhead, paid folds x repeats times here. `FoldTrainer` compiles one epoch once
(the keras.io "training loop from scratch" pattern) and resets the weights and Adam's state for every fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, ShuffleSplit, StratifiedShuffleSplit

from tlpipe.scoring import class_probabilities

MIN_FOLDS = 2


@dataclass(frozen=True)
class FoldPlan:
    folds: int  # what runs: crossval.folds, or fewer for a small class; 0 when nothing can be folded
    requested: int  # crossval.folds
    unfolded: list[str]  # classes with fewer than MIN_FOLDS train+val images: left out of the folds
    note: str  # why fewer folds than requested run, or why none; "" when all requested run

    def folded(self, y: np.ndarray, classes: list[str]) -> np.ndarray:
        """Mask of the images of `y` that the folds hold out (all but those of unfolded classes)."""
        return ~np.isin(y, [classes.index(name) for name in self.unfolded])


def fold_plan(y: np.ndarray, classes: list[str], requested: int) -> FoldPlan:
    """How many folds `y` (train+val labels) allows: `requested`, or the image count of its smallest class
    down to MIN_FOLDS. Classes under MIN_FOLDS are left out; fewer than two classes left means no folds."""
    counts = np.bincount(y, minlength=len(classes))
    unfolded = [classes[i] for i in np.flatnonzero(counts < MIN_FOLDS)]
    foldable = np.flatnonzero(counts >= MIN_FOLDS)
    if len(foldable) < 2:
        return FoldPlan(0, requested, unfolded, "fewer than two classes have 2 or more train+val images")
    smallest = int(foldable[np.argmin(counts[foldable])])
    folds = int(min(requested, counts[smallest]))
    note = ""
    if folds < requested:
        note = (
            f"crossval.folds {requested} lowered to {folds}: class {classes[smallest]!r} has {counts[smallest]} "
            "train+val images"
        )
    if unfolded:
        left_out = f"{len(unfolded)} classes with one train+val image left out of the folds"
        note = f"{note}; {left_out}" if note else left_out
    return FoldPlan(folds, requested, unfolded, note)


@dataclass(frozen=True)
class CrossValidation:
    accuracies: list[float]  # one per fold and repeat
    out_of_fold: np.ndarray  # (n, n_classes): each folded image's probabilities, averaged over the repeats
    best_epochs: list[int]  # Keras head: per fold and repeat, the epoch early stopping kept (1-based)

    def summary(self) -> dict[str, float]:
        return {
            "cv_accuracy_mean": round(float(np.mean(self.accuracies)), 6),
            "cv_accuracy_std": round(float(np.std(self.accuracies, ddof=1)), 6),
        }


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
    n_classes: int,
    train_settings: dict[str, Any],
    folds: int,
    repeats: int,
    val_fraction: float,
    seed: int,
) -> CrossValidation:
    """Train and score the head of `train_settings["head"]` on every fold of every repeat (folds seeded by
    `seed`; fold i's early-stopping slice, shuffling and initial weights by `seed + i`)."""
    summed = np.zeros((len(y), n_classes))
    accuracies, best_epochs = [], []
    if train_settings["head"] == "logistic":
        fit_fold = probe_fold_fits(x, y, n_classes, train_settings)
    else:
        fit_fold = keras_fold_fits(x, y, n_classes, train_settings, val_fraction)
    for index, (_, train, held_out) in enumerate(folds_of(y, folds, repeats, seed)):
        probabilities, best_epoch = fit_fold(train, held_out, seed + index)
        if best_epoch is not None:
            best_epochs.append(best_epoch)
        summed[held_out] += probabilities
        accuracies.append(float(np.mean(probabilities.argmax(axis=1) == y[held_out])))
    return CrossValidation(accuracies, summed / repeats, best_epochs)


# Fits one fold's head on the images `train` and returns its probabilities for `held_out`, and for the Keras
# head the epoch early stopping kept: (train, held_out, seed) -> (probabilities, best epoch or None).
FoldFit = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, "int | None"]]


def probe_fold_fits(x: np.ndarray, y: np.ndarray, n_classes: int, settings: dict[str, Any]) -> FoldFit:
    """Each fold's linear probe, fitted as the train stage fits it."""
    from tlpipe.models import fit_probe

    def fit_fold(train: np.ndarray, held_out: np.ndarray, seed: int) -> tuple[np.ndarray, None]:
        probe = fit_probe(x[train], y[train], n_classes, settings["dropout"], settings["class_weight"], seed)
        return class_probabilities(np.asarray(probe.head(x[held_out], training=False))), None

    return fit_fold


def keras_fold_fits(
    x: np.ndarray, y: np.ndarray, n_classes: int, settings: dict[str, Any], val_fraction: float
) -> FoldFit:
    """Each fold's Keras head, with one FoldTrainer (one compiled epoch) for every fold."""
    import keras

    from tlpipe.models import class_weights

    trainer = FoldTrainer(x.shape[1], n_classes, settings)
    labels = y.astype(np.float32)

    def fit_fold(train: np.ndarray, held_out: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
        fit_part, stop_part = early_stopping_split(y[train], val_fraction, seed)
        fit, stop = train[fit_part], train[stop_part]
        normalization = keras.layers.Normalization()
        normalization.adapt(x[fit])
        z = np.asarray(normalization(x))
        per_class = class_weights(y[fit], n_classes, settings["class_weight"]) or {}
        weights = np.array([per_class.get(int(label), 1.0) for label in y[fit]], dtype=np.float32)
        val_losses = trainer.fit((z[fit], labels[fit], weights), (z[stop], labels[stop]), seed)
        return class_probabilities(trainer.predict(z[held_out])), int(np.argmin(val_losses)) + 1

    return fit_fold
