"""Repeated stratified k-fold of the head on cached features: a second accuracy estimate that does not hang on
one test split, and out-of-fold probabilities for every train and validation image.

Each fold trains the head as the train stage does (models.train_head, params.yaml `train:`), with early
stopping on a stratified slice of the fold's own training part, so the held-out fold is never looked at
before it is scored.
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

    def summary(self) -> dict[str, float]:
        return {
            "cv_accuracy_mean": round(float(np.mean(self.accuracies)), 6),
            "cv_accuracy_std": round(float(np.std(self.accuracies, ddof=1)), 6),
        }


def check_folds(y: np.ndarray, classes: list[str], folds: int) -> None:
    counts = np.bincount(y, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] < folds:
        raise PipelineError(
            f"crossval.folds: {folds} folds need at least {folds} images of every class in train+val; "
            f"{classes[smallest]!r} has {counts[smallest]}; lower crossval.folds or add images"
        )


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


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    train_settings: dict[str, Any],
    crossval: dict[str, int],
    val_fraction: float,
    seed: int,
) -> CrossValidation:
    """Train and score the head on every fold of every repeat (folds seeded by `seed`)."""
    import tensorflow as tf

    from tlpipe.models import train_head

    check_folds(y, classes, crossval["folds"])
    n_classes = len(classes)
    summed = np.zeros((len(y), n_classes))
    accuracies = []
    for index, (_, train, held_out) in enumerate(folds_of(y, crossval["folds"], crossval["repeats"], seed)):
        fit, stop = early_stopping_split(y[train], val_fraction, seed + index)
        head, _ = train_head(
            (x[train][fit], y[train][fit]),
            (x[train][stop], y[train][stop]),
            n_classes,
            train_settings,
            seed + index,
            tf.distribute.get_strategy(),
            [],
        )
        probabilities = class_probabilities(head.predict(x[held_out], batch_size=1024, verbose=0))
        summed[held_out] += probabilities
        accuracies.append(float(np.mean(probabilities.argmax(axis=1) == y[held_out])))
    return CrossValidation(accuracies, summed / crossval["repeats"])
