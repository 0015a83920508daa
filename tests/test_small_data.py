"""The linear-probe head and what decides the head where the validation split is small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

from stages.train import what_to_fit
from tlpipe.evaluation import held_out_calibration
from tlpipe.models import PROBE_CS, fit_probe
from tlpipe.paths import crossval_metrics, out_of_fold
from tlpipe.small_data import median_epochs, validation_decides
from tlpipe.statistics import calibration


def clusters(per_class: list[int], dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes, on a scale the head must standardise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(per_class)), per_class)
    centres = rng.normal(0, 1.2, (len(per_class), dim))
    return (50.0 * (centres[y] + rng.normal(size=(len(y), dim)))).astype(np.float32), y


def standardised(x: np.ndarray) -> np.ndarray:
    """What the head's Normalization layer does, computed here with numpy."""
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-7)


@pytest.mark.parametrize("per_class", [[40, 30], [25, 20, 15, 10]])
def test_the_probe_is_scikit_learns_logistic_regression_in_a_keras_head(per_class: list[int]) -> None:
    x, y = clusters(per_class)
    probe = fit_probe(x, y, len(per_class), 0.2, None, seed=3)
    assert probe.c in PROBE_CS and probe.folds == 5
    reference = LogisticRegression(C=probe.c, max_iter=5000, tol=1e-8).fit(standardised(x), y)
    ours = np.asarray(probe.head(x, training=False))
    theirs = reference.predict_proba(standardised(x))
    if len(per_class) == 2:
        ours = np.concatenate([1 - ours, ours], axis=1)  # the head's sigmoid gives the second class
    # The probe stops at scikit-learn's default tolerance, the reference runs to convergence.
    np.testing.assert_allclose(ours, theirs, atol=5e-3)
    assert np.array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))
    assert probe.head.get_layer("head_dropout").rate == 0.2  # the head fine-tuning trains further


def test_the_probe_chooses_the_c_of_the_lowest_cross_validated_log_loss() -> None:
    """Each C's log loss over the same stratified folds, computed fold by fold here."""
    x, y = clusters([30, 24, 18], seed=5)
    probe = fit_probe(x, y, 3, 0.0, None, seed=9)
    z = standardised(x)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=9).split(z, y))
    by_hand = []
    for c in PROBE_CS:
        losses = []
        for train, held_out in folds:
            model = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(z[train], y[train])
            losses.append(log_loss(y[held_out], model.predict_proba(z[held_out]), labels=[0, 1, 2]))
        by_hand.append(np.mean(losses))
    np.testing.assert_allclose(probe.cv_losses, by_hand, rtol=0.02, atol=2e-3)
    assert probe.c == PROBE_CS[int(np.argmin(by_hand))]


def test_a_class_absent_from_the_probes_images_gets_almost_no_probability() -> None:
    x, y = clusters([20, 20, 20])
    keep = y != 1
    probe = fit_probe(x[keep], y[keep], 3, 0.0, None, seed=0)
    probabilities = np.asarray(probe.head(x))
    assert probabilities.shape == (60, 3) and probabilities[:, 1].max() < 1e-9
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_with_one_image_per_class_the_probe_cannot_cross_validate_and_says_so() -> None:
    x, y = clusters([1, 1, 1])
    probe = fit_probe(x, y, 3, 0.0, None, seed=0)
    assert (probe.folds, probe.c, probe.cv_losses) == (0, 1.0, [])
    assert "no class has two images" in probe.line(3)


def test_validation_decides_from_min_val_per_class_images_per_class_on_average() -> None:
    assert validation_decides(np.zeros(20, int), 2, 10) and not validation_decides(np.zeros(19, int), 2, 10)
    assert validation_decides(np.zeros(0, int), 5, 0)  # 0: validation always decides (params written before)
    assert median_epochs([3, 4, 9]) == 4 and median_epochs([3, 4]) == 4 and median_epochs([1]) == 1


def write_out_of_fold(root: Path, key: str, classes: list[str], y: np.ndarray, probabilities: np.ndarray) -> None:
    table = pd.DataFrame(
        {"path": [f"i{n}.png" for n in range(len(y))], "split": "train", "actual": np.array(classes)[y]}
    )
    for index, name in enumerate(classes):
        table[f"probability_{name}"] = probabilities[:, index]
    out_of_fold(key).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_of_fold(key), index=False)


def test_a_small_validation_split_calibrates_on_the_out_of_fold_probabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (600, 2))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(2, p=p) for p in truth])
    overconfident = np.exp(2 * logits) / np.exp(2 * logits).sum(axis=1, keepdims=True)
    overconfident[:5] = np.nan  # images of classes too small to fold: no probabilities, left out
    write_out_of_fold(tmp_path, "k", ["cats", "dogs"], y, overconfident)
    y_val = np.array([0, 1] * 5)  # 5 per class: under 10
    fitted = held_out_calibration("k", y_val, None, ["cats", "dogs"], 10, 0.05)
    assert fitted == calibration(y[5:], overconfident[5:], 0.05) | {"temperature_source": "out-of-fold"}
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.2)
    big_val = np.array([0, 1] * 10)
    val_probabilities = np.tile([[0.6, 0.4], [0.3, 0.7]], (10, 1))
    on_val = held_out_calibration("k", big_val, val_probabilities, ["cats", "dogs"], 10, 0.05)
    assert on_val == calibration(big_val, val_probabilities, 0.05) | {"temperature_source": "validation"}
    write_out_of_fold(tmp_path, "k", ["cats", "dogs"], y[:0], overconfident[:0])  # crossval could not run
    pd.read_csv(out_of_fold("k"))[["path", "split", "actual"]].to_csv(out_of_fold("k"), index=False)
    assert held_out_calibration("k", y_val, None, ["cats", "dogs"], 10, 0.05)["temperature_source"] == "none"


SETTINGS = {"head": "keras", "min_val_per_class": 10}


def features_of(n_train: int, n_val: int) -> dict[str, np.ndarray]:
    x, y = clusters([n_train + n_val, n_train + n_val])
    train = np.r_[0:n_train, n_train + n_val : 2 * n_train + n_val]
    val = np.setdiff1d(np.arange(len(y)), train)
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_val": x[val],
        "y_val": y[val],
        "x_train_aug": np.zeros((0, x.shape[1]), np.float32),
        "y_train_aug": np.zeros(0, np.int64),
    }


def test_the_train_stage_fits_on_train_where_validation_decides_and_on_train_plus_val_where_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    crossval_metrics("k").parent.mkdir(parents=True)
    crossval_metrics("k").write_text(json.dumps({"cv_accuracy_mean": 0.9, "best_epoch_median": 7}))
    big = what_to_fit("k", features_of(40, 10), 2, SETTINGS)
    assert len(big.y) == 80 and big.val is not None and big.epochs is None and big.on == "train"
    small = what_to_fit("k", features_of(40, 4), 2, SETTINGS)
    assert len(small.y) == 88 and small.val is None and small.epochs == 7
    assert small.on == (
        "train + val, because the validation split has 8 images for 2 classes (4.0 per class, under "
        "train.min_val_per_class: 10), for 7 epochs (the median crossval@k kept)"
    )
    probe = what_to_fit("k", features_of(40, 4), 2, SETTINGS | {"head": "logistic"})
    assert len(probe.y) == 88 and probe.val is None and not probe.on.endswith("kept)")
    crossval_metrics("k").write_text(json.dumps({"folds": 0}))  # crossval could not fold: no epochs to take
    fallback = what_to_fit("k", features_of(40, 4), 2, SETTINGS)
    assert len(fallback.y) == 80 and fallback.val is not None and "crossval@k kept no epochs" in fallback.on
