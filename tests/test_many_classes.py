"""Many classes: 100 classes of 5 images each through evaluation, and the scoring of such models.

With a hundred classes every probability is small, so rounding each one (to 6 decimals, say) can move a
row's sum further from 1 than scikit-learn's multiclass ROC AUC accepts (1e-5): scores must come from
unrounded probabilities. Whether rounding breaks a given row depends on its values, so the pipeline run
(random backbone, nearly uniform outputs) shows the pipeline works, and a model that is exactly uniform over
120 classes (1/120 rounds to 0.008333; rows sum to 0.99996) reproduces the crash every time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import one_backbone_project, stages_in_process
from tests.synthetic import encode, synthetic_image
from tlpipe.errors import PipelineError
from tlpipe.prediction import keras_classifier, predict_files
from tlpipe.scoring import classification_scores

N_CLASSES = 100
PER_CLASS = 5
CLASSES = [f"c{index:03d}" for index in range(N_CLASSES)]


def class_tree(root: Path) -> Path:
    """A single <class>/ tree; prepare keeps 1 test, 1 validation and 3 training images of each class."""
    rng = np.random.default_rng(11)
    for index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for n in range(PER_CLASS):
            (folder / f"{n}.jpg").write_bytes(encode(synthetic_image(index, rng, 32)))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logistic", "keras"])
def test_hundred_classes_of_five_images_from_prepare_to_the_shipped_model(tmp_path: Path, head: str) -> None:
    """The small-data path end to end, the stages' own code in this process (tests.helpers.stages_in_process).
    With 4 train+val images per class, cross-validation drops to 4 folds and the audit still searches label
    issues; with 1 validation image per class, the head is fitted on train + val (the Keras head for the
    epochs the folds kept), calibrated out of fold, and the frozen base and head ship without fine-tuning."""
    project = one_backbone_project(
        tmp_path / "project",
        str(class_tree(tmp_path / "images")),
        "mobilenet",
        "MobileNetV2",
        32,
        train={"epochs": 5, "patience": 2, "head": head},
    )
    _, stderr = stages_in_process(
        project,
        ("fetch",),
        ("prepare",),
        ("features", "mobilenet"),
        ("crossval", "mobilenet"),
        ("train", "mobilenet"),
        ("audit",),
        ("evaluate", "mobilenet"),
        ("finetune",),
        ("ship",),
        ("evaluate_model",),
    )
    assert "crossval.folds 5 lowered to 4: class 'c000' has 4 train+val images" in stderr
    ran = json.loads((project / "metrics/crossval/mobilenet.json").read_text())
    assert (ran["folds"], ran["repeats"], ran["folds_requested"]) == (4, 2, 5)
    assert "label issues" not in stderr
    assert json.loads((project / "metrics/audit.json").read_text())["label_issues_checked"] == 4 * N_CLASSES
    small = "the validation split has 100 images for 100 classes (1.0 per class, under train.min_val_per_class: 10)"
    assert f"fitted on train + val, because {small}" in stderr
    if head == "keras":
        assert f"for {ran['best_epoch_median']} epochs (the median crossval@mobilenet kept)" in stderr
        logged = json.loads((project / "metrics/train/mobilenet/metrics.json").read_text())
        assert logged["step"] == ran["best_epoch_median"] - 1  # trained exactly that many epochs
    else:
        assert "best_epoch_median" not in ran and "linear probe on 400 images, C = " in stderr

    assert json.loads((project / "data/prepared/classes.json").read_text()) == CLASSES
    metrics = json.loads((project / "metrics/mobilenet.json").read_text())
    assert metrics["n_test"] == N_CLASSES and metrics["temperature_source"] == "out-of-fold"
    assert math.isfinite(metrics["roc_auc"]) and 0.0 <= metrics["roc_auc"] <= 1.0, metrics
    assert math.isfinite(metrics["loss"]), metrics
    assert 0 <= metrics["top5_accuracy_ci_low"] <= metrics["top5_accuracy"] <= metrics["top5_accuracy_ci_high"]
    assert metrics["f1_ci_low"] is None and metrics["intervals_note"].startswith("F1 and ROC AUC have no interval")
    predictions = pd.read_csv(project / "reports/evaluation/mobilenet/predictions.csv")
    assert len(predictions) == N_CLASSES and set(predictions["actual"]) == set(CLASSES)
    assert len(pd.read_csv(project / "reports/evaluation/mobilenet/per_class.csv")) == N_CLASSES
    roc = json.loads((project / "reports/evaluation/mobilenet/roc.json").read_text())
    assert {r["class"] for r in roc} == set(CLASSES)  # one-vs-rest: one curve per class

    shipped = json.loads((project / "metrics/model.json").read_text())
    assert shipped["shipped"] == "frozen" and shipped["shipped_reason"].startswith(f"not fine-tuned: {small}")
    assert f"mobilenet: not fine-tuned: {small}" in stderr
    assert json.loads((project / "metrics/finetune/metrics.json").read_text())["epochs"] == 0
    # The frozen base and head, shipped end to end, score the test images as the head did on cached features.
    assert shipped["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.02)


def uniform_model(n_classes: int):
    """Raw RGB of any size -> the same 1 / n_classes for every class (a zero Dense layer before the softmax)."""
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(n_classes, activation="softmax", kernel_initializer="zeros")(x)
    return keras.Model(inputs, outputs)


def test_a_model_unsure_among_120_classes_is_scored(tmp_path: Path) -> None:
    """The issue's crash: evaluate_model's path (predict_files, then classification_scores) on 120 classes."""
    n_classes = 120
    rng = np.random.default_rng(0)
    images = []
    for index in range(n_classes):
        images.append(tmp_path / f"{index}.png")
        images[-1].write_bytes(encode(synthetic_image(index, rng, 8), "PNG"))
    labels = [f"c{index:03d}" for index in range(n_classes)]
    predictions = list(predict_files(keras_classifier(uniform_model(n_classes), labels), images))
    probabilities = np.array([p.probabilities for p in predictions])
    scores = classification_scores(np.arange(n_classes), probabilities)
    assert scores["roc_auc"] == 0.5 and scores["n_test"] == n_classes  # every score tied
    assert np.abs(probabilities.sum(axis=1) - 1).max() < 1e-6  # the model's own float32 values, unrounded


def near_uniform(n_rows: int, n_classes: int, seed: int = 0) -> np.ndarray:
    """Softmax rows of small logits: every probability near 1 / n_classes, as from an untrained head."""
    logits = np.random.default_rng(seed).normal(0, 0.5, (n_rows, n_classes))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_rows_off_by_float_error_are_scored() -> None:
    """Rows a little off 1 (float32 arithmetic over thousands of classes) are renormalised, not refused."""
    probabilities = near_uniform(N_CLASSES, N_CLASSES)
    probabilities[:, 0] += 2e-5  # each row now sums to 1.00002: scikit-learn alone would refuse it
    y_true = np.arange(N_CLASSES)
    scores = classification_scores(y_true, probabilities)
    exact = classification_scores(y_true, near_uniform(N_CLASSES, N_CLASSES))
    assert math.isfinite(scores["roc_auc"]) and scores["roc_auc"] == pytest.approx(exact["roc_auc"], abs=1e-3)
    assert scores["n_test"] == N_CLASSES


def test_rows_that_are_not_probabilities_are_refused() -> None:
    outputs = near_uniform(4, 3) * 2  # e.g. logits or a multi-label sigmoid head, not a softmax
    with pytest.raises(PipelineError, match="not class probabilities: row 0 of 4 sums to 2 "):
        classification_scores(np.array([0, 1, 2, 0]), outputs)
