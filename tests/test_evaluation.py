"""write_evaluation: the metrics file DVC reads and the evaluation folder, for a backbone and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from tlpipe.evaluation import write_evaluation


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

    scores = write_evaluation(name, paths, y_true, probabilities, ["cats", "dogs"], extra)

    metric = json.loads((tmp_path / f"metrics/{name}.json").read_text())
    assert metric == scores == json.loads((tmp_path / f"reports/evaluation/{name}/metrics.json").read_text())
    assert metric["accuracy"] == pytest.approx(accuracy_score(y_true, positive > 0.5))
    assert metric["roc_auc"] == pytest.approx(roc_auc_score(y_true, positive))
    assert metric["n_test"] == 40 and metric["params"] == 123
    predictions = pd.read_csv(tmp_path / f"reports/evaluation/{name}/predictions.csv")
    assert list(predictions["path"]) == paths
    assert list(predictions["actual"]) == [["cats", "dogs"][i] for i in y_true]
    assert len(json.loads((tmp_path / f"reports/evaluation/{name}/confusion.json").read_text())) == 40
    for picture in ("confusion.png", "roc.png", "errors.png"):
        assert (tmp_path / f"reports/evaluation/{name}/{picture}").read_bytes()[:4] == b"\x89PNG"
