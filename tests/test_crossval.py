"""Repeated stratified k-fold of the head on cached features (tlpipe.crossvalidation)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_train_aggregate import separable_features
from tlpipe.crossvalidation import FoldTrainer, check_folds, cross_validate, early_stopping_split, folds_of
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


def noisy_classes(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes: a head's val_loss bottoms out and rises again, so early stopping has work."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.normal(0, 1, (n, dim)) + 0.8 * np.eye(n_classes, dim)[y]
    return x.astype(np.float32), y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_a_fold_trainer_epoch_is_a_keras_fit_epoch_with_class_weights(n_classes: int) -> None:
    """One full-batch epoch equals model.fit's step from the same weights: loss, class weights, reduction, Adam."""
    import keras

    from tlpipe.models import class_weights, loss_for

    x, y = noisy_classes(90, 6, n_classes, seed=3)
    y[:50] = 0  # imbalanced, so the class weights matter
    settings = {**TRAIN, "batch_size": len(y), "learning_rate": 0.05, "dropout": 0.0, "class_weight": "balanced"}
    trainer = FoldTrainer(x.shape[1], n_classes, settings)
    trainer.reset(seed=7)
    reference = keras.models.clone_model(trainer.model)
    reference.set_weights(trainer.model.get_weights())
    per_class = class_weights(y, n_classes, "balanced")
    weights = np.array([per_class[label] for label in y], dtype=np.float32)
    labels = y.astype(np.float32)
    for _ in range(3):
        trainer.epoch(x, labels, weights, x, labels, np.array([1, 2], dtype=np.int32))
    reference.compile(optimizer=keras.optimizers.Adam(learning_rate=0.05), loss=loss_for(n_classes))
    reference.fit(x, y, batch_size=len(y), epochs=3, class_weight=per_class, shuffle=False, verbose=0)
    for ours, theirs in zip(trainer.model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_fold_trainer_stops_after_patience_and_keeps_the_best_epoch() -> None:
    import keras

    x, y = noisy_classes(200, 40, 2, seed=0)
    settings = {**TRAIN, "batch_size": 16, "learning_rate": 0.05, "dropout": 0.2, "patience": 5}
    trainer = FoldTrainer(x.shape[1], 2, settings)
    fit, stop = np.arange(100), np.arange(100, 200)
    labels = y.astype(np.float32)
    val_losses = trainer.fit((x[fit], labels[fit], np.ones(100, np.float32)), (x[stop], labels[stop]), seed=1)
    best = int(np.argmin(val_losses))
    assert len(val_losses) == best + 1 + 5 < 60  # overfits 40 features on 100 images: stops early
    kept = keras.losses.binary_crossentropy(labels[stop][:, None], trainer.predict(x[stop]))
    assert float(np.mean(kept)) == pytest.approx(val_losses[best], rel=1e-5)  # the best epoch's weights
    # A fold's head depends on its data and seed alone: the same fit after another gives the same head.
    first = trainer.predict(x)
    trainer.fit((x[stop], labels[stop], np.ones(100, np.float32)), (x[fit], labels[fit]), seed=2)
    trainer.fit((x[fit], labels[fit], np.ones(100, np.float32)), (x[stop], labels[stop]), seed=1)
    np.testing.assert_array_equal(trainer.predict(x), first)


@pytest.mark.slow
def test_cross_validation_scores_every_image_out_of_fold() -> None:
    """Reruns give the same numbers: tests/test_pipeline_e2e.py reruns the crossval stage by force."""
    x, y = separable_features(300, 8)
    result = cross_validate(x, y, ["cats", "dogs"], TRAIN, {"folds": 3, "repeats": 2}, 0.2, seed=1)
    assert len(result.accuracies) == 6 and result.summary()["cv_accuracy_mean"] > 0.9
    assert all(1 <= epoch <= TRAIN["epochs"] for epoch in result.best_epochs)
    assert result.out_of_fold.shape == (300, 2) and np.allclose(result.out_of_fold.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(result.out_of_fold.argmax(axis=1) == y) > 0.9
    again = cross_validate(x, y, ["cats", "dogs"], TRAIN, {"folds": 3, "repeats": 2}, 0.2, seed=1)
    np.testing.assert_array_equal(again.out_of_fold, result.out_of_fold)
