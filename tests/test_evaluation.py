"""write_evaluation: the metrics file DVC reads and the evaluation folder, for a backbone and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from tlpipe.errors import PipelineError
from tlpipe.evaluation import correct_by_path, write_evaluation
from tlpipe.statistics import apply_temperature, expected_calibration_error

STATS = {"confidence": 0.95, "bootstrap": 300, "alpha": 0.05}
NO_SCALING = {"temperature": 1.0, "temperature_fitted": 1.0, "temperature_p_value": 1.0}


def test_a_single_class_test_split_gets_null_auc_with_its_reason_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4]])  # all right: no error pictures to draw
    scores = write_evaluation(
        "toy", ["a", "b", "c"], np.zeros(3, int), probabilities, ["cats", "dogs"], {}, STATS, 0, NO_SCALING
    )
    text = (tmp_path / "metrics/toy.json").read_text()
    assert "NaN" not in text and json.loads(text)["roc_auc"] is None
    assert scores["roc_auc_ci_low"] is None and "every test image is 'cats'" in scores["roc_auc_note"]
    err = capsys.readouterr().err
    assert "warning: toy: only 3 test images (fewer than 30)" in err and "ROC AUC undefined" in err


@pytest.mark.parametrize("name", ["toy", "model"])
def test_an_evaluation_writes_the_metric_and_every_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 40)
    positive = np.clip(0.7 * y_true + 0.3 * rng.random(40), 0, 1)
    probabilities = np.stack([1 - positive, positive], axis=1)
    paths = [f"data/prepared/images/{i}.png" for i in range(40)]
    extra = {"params": 123, "images_per_second": 4.5} | ({"backbone": "toy"} if name == "model" else {})

    calibration = {"temperature": 1.5, "temperature_fitted": 1.5, "temperature_p_value": 0.001}
    scores = write_evaluation(name, paths, y_true, probabilities, ["cats", "dogs"], extra, STATS, 0, calibration)

    metric = json.loads((tmp_path / f"metrics/{name}.json").read_text())
    assert metric == scores == json.loads((tmp_path / f"reports/evaluation/{name}/metrics.json").read_text())
    assert metric["accuracy"] == pytest.approx(accuracy_score(y_true, positive > 0.5))
    assert metric["roc_auc"] == pytest.approx(roc_auc_score(y_true, positive))
    assert metric["n_test"] == 40 and metric["params"] == 123
    predictions = pd.read_csv(tmp_path / f"reports/evaluation/{name}/predictions.csv")
    assert list(predictions["path"]) == paths
    assert list(predictions["actual"]) == [["cats", "dogs"][i] for i in y_true]
    assert len(json.loads((tmp_path / f"reports/evaluation/{name}/confusion.json").read_text())) == 40
    for picture in ("confusion.png", "roc.png", "errors.png", "reliability.png"):
        assert (tmp_path / f"reports/evaluation/{name}/{picture}").read_bytes()[:4] == b"\x89PNG"
    # The existing keys stay uncalibrated; the temperature's figures have keys of their own.
    calibrated = apply_temperature(probabilities, 1.5)
    assert metric["temperature"] == 1.5
    assert metric["loss"] == pytest.approx(log_loss(y_true, probabilities), abs=1e-6)
    assert metric["loss_calibrated"] == pytest.approx(log_loss(y_true, calibrated), abs=1e-6)
    assert metric["ece"] == expected_calibration_error(y_true, probabilities)
    assert metric["ece_calibrated"] == expected_calibration_error(y_true, calibrated)
    assert predictions["probability_calibrated"].to_numpy() == pytest.approx(calibrated.max(axis=1), abs=1e-6)
    for key in ("accuracy", "f1", "roc_auc"):
        assert metric[f"{key}_ci_low"] <= metric[key] <= metric[f"{key}_ci_high"], key


def test_a_missing_evaluation_to_pair_with_is_one_line(tmp_path: Path) -> None:
    """evaluate_model pairs the shipped model with its backbone's frozen evaluation, which may not exist yet
    when stages are run by hand."""
    missing = tmp_path / "reports/evaluation/mobilenet/predictions.csv"
    with pytest.raises(PipelineError, match="^.*predictions.csv is missing; run dvc repro to write it$"):
        correct_by_path(missing)


def test_many_small_classes_get_top5_a_per_class_table_and_say_which_intervals_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 classes of 1-3 test images: top-5 accuracy with its interval, a per-class table equal to one
    counted by hand, no F1 or ROC AUC interval and a note saying why."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(12)
    classes = [f"breed{i:03d}" for i in range(120)]
    y_true = np.repeat(np.arange(120), rng.integers(1, 4, 120))
    logits = rng.normal(size=(len(y_true), 120)) + 2.5 * np.eye(120)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    paths = [f"data/prepared/images/{i}.png" for i in range(len(y_true))]
    Path("data/prepared/images").mkdir(parents=True)
    for path in paths:  # the picture of errors shows them
        Image.new("RGB", (8, 8)).save(path)
    scores = write_evaluation("toy", paths, y_true, probabilities, classes, {}, STATS, 0, NO_SCALING)

    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert scores["top5_accuracy"] == pytest.approx(np.mean((top5 == y_true[:, None]).any(axis=1)), abs=1e-6)
    assert scores["top5_accuracy_ci_low"] < scores["top5_accuracy"] < scores["top5_accuracy_ci_high"]
    assert scores["accuracy_ci_low"] < scores["accuracy"] < scores["accuracy_ci_high"]
    assert scores["f1_ci_low"] is None and scores["roc_auc_ci_low"] is None
    assert scores["intervals_note"].startswith("F1 and ROC AUC have no interval: 120 of 120 classes have fewer")

    table = pd.read_csv(tmp_path / "reports/evaluation/toy/per_class.csv", keep_default_na=False)
    predicted = probabilities.argmax(axis=1)
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert list(table["class"]) == classes
    for row in table.itertuples():
        index = classes.index(row._1)
        hits = int(np.sum((predicted == index) & (y_true == index)))
        assert row.support == int(np.sum(y_true == index))
        assert row.recall == pytest.approx(hits / row.support, abs=1e-6)
        called = int(np.sum(predicted == index))
        assert row.precision == pytest.approx(hits / called if called else 0.0, abs=1e-6)
        assert row.f1 == pytest.approx(2 * hits / (row.support + called), abs=1e-6)
    assert scores["f1"] == pytest.approx(table["f1"].mean(), abs=1e-5)  # the macro F1 is their mean
