"""Test-set scores and plot records against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.scoring import class_probabilities, classification_scores, confusion_records, roc_records


def test_binary_scores_by_hand() -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    p_dog = np.array([0.1, 0.6, 0.8, 0.4, 0.9])  # one false positive, one false negative
    scores = classification_scores(y_true, class_probabilities(p_dog.reshape(-1, 1)))
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["roc_auc"] == pytest.approx(5 / 6)  # 5 of 6 (positive, negative) pairs ranked right
    expected_loss = -np.mean(np.log([0.9, 0.4, 0.8, 0.4, 0.9]))
    assert scores["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert scores["n_test"] == 5


def test_multiclass_scores_are_macro_averages() -> None:
    y_true = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    scores = classification_scores(y_true, probabilities)
    assert scores["accuracy"] == pytest.approx(3 / 4)
    assert scores["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert 0.5 < scores["roc_auc"] <= 1.0


def test_confusion_and_roc_records() -> None:
    classes = ["cats", "dogs"]
    records = confusion_records(np.array([0, 1, 1]), np.array([0, 0, 1]), classes)
    assert records == [
        {"actual": "cats", "predicted": "cats"},
        {"actual": "dogs", "predicted": "cats"},
        {"actual": "dogs", "predicted": "dogs"},
    ]
    roc = roc_records(np.array([0, 1, 1]), class_probabilities(np.array([[0.2], [0.7], [0.9]])), classes)
    assert roc[0]["fpr"] == 0.0 and roc[-1] == {"class": "dogs", "fpr": 1.0, "tpr": 1.0, "threshold": 0.2}
    assert all(0.0 <= r["threshold"] <= 1.0 for r in roc)
