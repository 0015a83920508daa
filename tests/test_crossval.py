"""Repeated stratified k-fold of the head on cached features (tlpipe.crossvalidation)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_train_aggregate import separable_features
from tlpipe.crossvalidation import check_folds, cross_validate, early_stopping_split, folds_of
from tlpipe.errors import PipelineError

TRAIN = {
    "epochs": 60,
    "batch_size": 32,
    "learning_rate": 0.01,
    "dropout": 0.0,
    "hidden_units": 0,
    "patience": 10,
    "class_weight": None,
}


def test_every_image_is_held_out_once_per_repeat_and_folds_are_stratified_and_seeded() -> None:
    y = np.array([0] * 40 + [1] * 20)
    runs = list(folds_of(y, folds=4, repeats=3, seed=5))
    assert len(runs) == 12
    for repeat in range(3):
        held = np.concatenate([held_out for r, _, held_out in runs if r == repeat])
        assert sorted(held) == list(range(60))
    for _, train, held_out in runs:
        assert np.bincount(y[held_out]).tolist() == [10, 5] and len(np.intersect1d(train, held_out)) == 0
    again = list(folds_of(y, folds=4, repeats=3, seed=5))
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(runs, again))
    assert not all(np.array_equal(a[2], b[2]) for a, b in zip(runs, folds_of(y, folds=4, repeats=3, seed=6)))


def test_too_few_images_of_a_class_for_the_folds_is_one_line() -> None:
    with pytest.raises(
        PipelineError, match=r"crossval.folds: 5 folds need at least 5 images of every class.*'plums' has 4"
    ):
        check_folds(np.array([0] * 10 + [1] * 4), ["kiwis", "plums"], 5)


@pytest.mark.parametrize("counts", [[40, 40], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
def test_early_stopping_slice_comes_from_the_folds_training_part(counts: list[int]) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    fit, stop = early_stopping_split(y, 0.2, seed=0)
    assert len(np.intersect1d(fit, stop)) == 0 and len(fit) + len(stop) == len(y)
    if len(counts) == 2:
        assert np.bincount(y[stop]).tolist() == [8, 8]  # stratified where every class can give to both


@pytest.mark.slow
def test_cross_validation_scores_every_image_out_of_fold() -> None:
    """Reruns give the same numbers: tests/test_pipeline_e2e.py reruns the crossval stage by force."""
    import keras

    keras.utils.set_random_seed(0)  # the heads' initial weights come from the global seed, as in the stage
    x, y = separable_features(120, 8)
    result = cross_validate(x, y, ["cats", "dogs"], TRAIN, {"folds": 3, "repeats": 2}, 0.2, seed=1)
    assert len(result.accuracies) == 6 and result.summary()["cv_accuracy_mean"] > 0.9
    assert result.out_of_fold.shape == (120, 2) and np.allclose(result.out_of_fold.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(result.out_of_fold.argmax(axis=1) == y) > 0.9
