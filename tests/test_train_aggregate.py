"""The head and its training data, and the comparison table built from evaluation folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlpipe import comparison
from tlpipe.feature_cache import training_arrays
from tlpipe.models import build_head, load_model, loss_for, save_model


def separable_features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, dim)) * 300.0  # VGG-like scale: the head must normalise it
    x[:, 0] += np.where(y == 1, 900.0, -900.0)
    return x.astype(np.float32), y


def test_training_arrays_append_augmented_views() -> None:
    features = {
        "x_train": np.ones((3, 2), np.float16),
        "y_train": np.array([0, 1, 0]),
        "x_train_aug": np.zeros((6, 2), np.float16),
        "y_train_aug": np.array([0, 1, 0, 0, 1, 0]),
    }
    x, y = training_arrays(features)
    assert x.dtype == np.float32 and x.shape == (9, 2) and x[:3].min() == 1 and x[3:].max() == 0
    assert list(y) == [0, 1, 0, 0, 1, 0, 0, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize(("n_classes", "output_units"), [(2, 1), (3, 3)])
def test_head_learns_and_survives_a_save_load_round_trip(tmp_path: Path, n_classes: int, output_units: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    x, y = separable_features(400, 16)
    if n_classes == 3:
        y = np.where(x[:, 1] > 0, 2, y)
    head = build_head(x, n_classes, dropout=0.1, hidden_units=8)
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_for(n_classes), metrics=["accuracy"])
    head.fit(x, y, epochs=30, batch_size=64, verbose=0)
    assert head.output_shape == (None, output_units)
    _, accuracy = head.evaluate(x, y, verbose=0)
    assert accuracy > 0.9
    save_model(head, tmp_path / "models" / "head.keras")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["head.keras"]  # no temporary file left
    reloaded = load_model(tmp_path / "models" / "head.keras")
    np.testing.assert_allclose(reloaded.predict(x[:8], verbose=0), head.predict(x[:8], verbose=0), rtol=1e-5)


def write_evaluation(root: Path, key: str, accuracy: float, roc_auc: float) -> None:
    folder = root / "reports" / "evaluation" / key
    folder.mkdir(parents=True)
    scores = {
        "accuracy": accuracy,
        "precision": 0.9,
        "recall": 0.9,
        "f1": 0.9,
        "roc_auc": roc_auc,
        "loss": 0.2,
        "n_test": 100,
        "params": 1_000_000,
        "images_per_second": 50.0,
    }
    (folder / "metrics.json").write_text(json.dumps(scores))


def test_aggregate_ranks_by_accuracy_and_writes_every_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = {
        "model": "c",
        "backbones": {
            k: {"arch": a, "image_size": 32, "weights": None}
            for k, a in [("a", "VGG16"), ("b", "ResNet50"), ("c", "MobileNetV2")]
        },
    }
    write_evaluation(tmp_path, "model", 0.95, 0.99)
    write_evaluation(tmp_path, "a", 0.90, 0.95)
    write_evaluation(tmp_path, "b", 0.97, 0.99)
    write_evaluation(tmp_path, "c", 0.97, 0.98)
    write_evaluation(tmp_path, "stale", 1.0, 1.0)  # a backbone no longer in params.yaml is left out
    table = comparison.comparison_table(params)
    assert list(table["backbone"]) == ["b", "c", "model", "a"]  # ties broken by ROC AUC
    assert table.set_index("backbone").loc["model", "arch"] == "MobileNetV2 fine-tuned"
    summary = comparison.summary(table)
    assert summary["best"] == "b" and summary["best_accuracy"] == 0.97
    assert list(summary["backbones"]) == ["b", "c", "model", "a"]
    comparison.chart(table, tmp_path / "reports" / "comparison.png")
    assert (tmp_path / "reports" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    markdown = comparison.markdown(table)
    assert markdown.count("\n| ") == 5 and "| b " in markdown.splitlines()[6]


def test_aggregate_names_the_missing_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlpipe.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"reports/evaluation/x/metrics.json is missing"):
        comparison.comparison_table(
            {"model": "x", "backbones": {"x": {"arch": "VGG16", "image_size": 32, "weights": None}}}
        )
