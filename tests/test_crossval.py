"""Repeated stratified k-fold of the head on cached features (tlpipe.crossvalidation)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_train_aggregate import separable_features
from tlpipe.crossvalidation import FoldTrainer, cross_validate, early_stopping_split, fold_plan, folds_of

TRAIN = {
    "epochs": 60,
    "batch_size": 32,
    "learning_rate": 0.01,
    "dropout": 0.0,
    "hidden_units": 0,
    "patience": 10,
    "class_weight": None,
    "head": "keras",
    "min_val_per_class": 10,
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


def test_the_folds_drop_to_what_the_smallest_class_allows_and_say_why() -> None:
    plan = fold_plan(np.array([0] * 10 + [1] * 4), ["kiwis", "plums"], 5)
    assert (plan.folds, plan.requested, plan.unfolded) == (4, 5, [])
    assert plan.note == "crossval.folds 5 lowered to 4: class 'plums' has 4 train+val images"
    assert fold_plan(np.array([0] * 10 + [1] * 5), ["kiwis", "plums"], 5).note == ""
    two = fold_plan(np.array([0] * 10 + [1] * 2 + [2] * 7), ["kiwis", "plums", "figs"], 5)
    assert (two.folds, two.unfolded) == (2, [])


def test_a_class_of_one_image_is_left_out_of_the_folds_and_named() -> None:
    """One image cannot be both held out and trained on: its class is named, and the rest still fold."""
    y = np.array([0] * 6 + [1] * 1 + [2] * 3 + [3] * 1)
    classes = ["kiwis", "plums", "figs", "limes"]
    plan = fold_plan(y, classes, 5)
    assert (plan.folds, plan.unfolded) == (3, ["plums", "limes"])
    assert plan.note == (
        "crossval.folds 5 lowered to 3: class 'figs' has 3 train+val images; "
        "2 classes with one train+val image left out of the folds"
    )
    assert plan.folded(y, classes).tolist() == [True] * 6 + [False] + [True] * 3 + [False]
    nothing = fold_plan(np.array([0, 0, 1, 2]), ["kiwis", "plums", "figs"], 5)
    assert nothing.folds == 0 and nothing.note == "fewer than two classes have 2 or more train+val images"


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
    result = cross_validate(x, y, 2, TRAIN, 3, 2, 0.2, seed=1)
    assert len(result.accuracies) == 6 and result.summary()["cv_accuracy_mean"] > 0.9
    assert all(1 <= epoch <= TRAIN["epochs"] for epoch in result.best_epochs)
    assert result.out_of_fold.shape == (300, 2) and np.allclose(result.out_of_fold.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(result.out_of_fold.argmax(axis=1) == y) > 0.9
    again = cross_validate(x, y, 2, TRAIN, 3, 2, 0.2, seed=1)
    np.testing.assert_array_equal(again.out_of_fold, result.out_of_fold)


def test_cross_validation_of_the_linear_probe_fits_each_fold_as_the_train_stage_does() -> None:
    """Each fold's probabilities are those of fit_probe on that fold's training part, with the fold's seed."""
    from tlpipe.models import fit_probe

    x, y = noisy_classes(120, 6, 3, seed=4)
    settings = {**TRAIN, "head": "logistic"}
    result = cross_validate(x, y, 3, settings, 3, 1, 0.2, seed=7)
    assert result.best_epochs == [] and result.out_of_fold.shape == (120, 3)
    _, train, held_out = next(folds_of(y, 3, 1, 7))
    probe = fit_probe(x[train], y[train], 3, settings["dropout"], None, 7)
    np.testing.assert_allclose(result.out_of_fold[held_out], np.asarray(probe.head(x[held_out])), rtol=1e-5, atol=1e-6)
    assert np.mean(result.out_of_fold.argmax(axis=1) == y) > 0.5
