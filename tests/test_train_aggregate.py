"""The head and its training data, and the comparison table built from evaluation folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
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


N_TEST = 200


def write_evaluation(
    root: Path, key: str, n_right: int, roc_auc: float, speed: float = 50.0, latency: float | None = None
) -> None:
    """An evaluation folder whose first `n_right` of N_TEST images (half cats, half dogs) are right, and the
    crossval metrics of a backbone."""
    folder = root / "reports" / "evaluation" / key
    folder.mkdir(parents=True)
    accuracy = n_right / N_TEST
    scores = {
        "accuracy": accuracy,
        "precision": 0.9,
        "recall": 0.9,
        "f1": 0.9,
        "roc_auc": roc_auc,
        "loss": 0.2,
        "n_test": N_TEST,
        "accuracy_ci_low": accuracy - 0.02,
        "accuracy_ci_high": min(1.0, accuracy + 0.02),
        "ece": 0.03,
        "ece_calibrated": 0.02,
        "params": 1_000_000,
        "images_per_second": speed,
    }
    if latency is not None:
        scores |= {"size_bytes": 4_000_000, "latency_ms_p50": latency, "latency_ms_p95": 1.5 * latency}
    (folder / "metrics.json").write_text(json.dumps(scores))
    actual = ["cats", "dogs"] * (N_TEST // 2)
    other = {"cats": "dogs", "dogs": "cats"}
    predicted = [label if i < n_right else other[label] for i, label in enumerate(actual)]
    pd.DataFrame({"path": [f"img{i}.jpg" for i in range(N_TEST)], "actual": actual, "predicted": predicted}).to_csv(
        folder / "predictions.csv", index=False
    )
    if key != "model":
        crossval = root / "metrics" / "crossval"
        crossval.mkdir(parents=True, exist_ok=True)
        (crossval / f"{key}.json").write_text(json.dumps({"cv_accuracy_mean": 0.95, "cv_accuracy_std": 0.01}))


def study_params(model: str = "c") -> dict:
    return {
        "seed": 0,
        "model": model,
        "stats": {"confidence": 0.95, "bootstrap": 500, "alpha": 0.05},
        "backbones": {
            k: {"arch": a, "image_size": 32, "weights": None}
            for k, a in [("a", "VGG16"), ("b", "ResNet50"), ("c", "MobileNetV2")]
        },
    }


def test_aggregate_ranks_tests_against_the_best_and_recommends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_evaluation(tmp_path, "b", 194, 0.99, speed=10.0, latency=40.0)  # best
    write_evaluation(tmp_path, "c", 192, 0.98, speed=50.0, latency=8.0)  # 2 images behind: tied
    write_evaluation(tmp_path, "model", 191, 0.99)  # 3 behind: tied
    write_evaluation(tmp_path, "a", 160, 0.95, speed=100.0, latency=20.0)  # fastest, but 34 behind: worse
    write_evaluation(tmp_path, "stale", 200, 1.0)  # a backbone no longer in params.yaml is left out
    params = study_params()
    table = comparison.comparison_table(params)
    assert list(table["backbone"]) == ["b", "c", "model", "a"]
    assert list(table["verdict"]) == ["best", "tied with best", "tied with best", "worse"]
    rows = table.set_index("backbone")
    assert rows.loc["model", "arch"] == "MobileNetV2 fine-tuned"
    assert rows.loc["c", "p_value"] == pytest.approx(0.5) and rows.loc["model", "p_value"] == pytest.approx(0.25)
    assert rows.loc["a", "p_value"] < 1e-9 and rows.loc["a", "difference_to_best"] == pytest.approx(-0.17)
    assert rows.loc["a", "difference_ci_high"] < 0 < rows.loc["c", "difference_ci_high"]  # c tied: 0 inside
    assert rows.loc["c", "cv_accuracy_mean"] == 0.95 and np.isnan(rows.loc["model", "cv_accuracy_mean"])
    # The shipped model is its backbone (c) fine-tuned: the same architecture, so the same deployment cost.
    assert rows.loc["model", ["size_bytes", "latency_ms_p50", "latency_ms_p95"]].tolist() == [4_000_000, 8.0, 12.0]
    assert list(comparison.pareto_front(table["latency_ms_p50"], table["accuracy"])) == [True, True, False, False]
    comparison.pareto_chart(table, tmp_path / "reports" / "pareto.png")
    assert (tmp_path / "reports" / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    summary = comparison.summary(table, params)
    assert summary["best"] == "b" and summary["best_accuracy"] == 0.97
    assert summary["tied_with_best"] == "c, model"
    assert summary["recommended"] == "c"  # faster than b, and a is significantly worse
    assert summary["recommended_reason"].startswith(
        "c (50.0 images/s, 1.0 M parameters): the fastest feature extraction of the 2 frozen backbones"
    )
    assert list(summary["backbones"]) == ["b", "c", "model", "a"]
    comparison.chart(table, tmp_path / "reports" / "comparison.png")
    assert (tmp_path / "reports" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    markdown = comparison.markdown(table, params)
    assert markdown.count("\n| ") == 5 and "| b " in markdown.splitlines()[6]
    assert "nan" not in markdown.lower() and "**Recommended: c.**" in markdown
    assert "0.9700 [0.9500, 0.9900]" in markdown and "tied with best" in markdown
    assert "4.0 MB" in markdown and "40.0 / 60.0 ms" in markdown and "8.0 / 12.0 ms" in markdown


def test_the_pareto_front_against_a_search_of_every_pair() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        # Few distinct values, so that ties in either coordinate are common.
        latency, accuracy = rng.integers(1, 6, n).astype(float), rng.integers(90, 95, n) / 100
        beaten = [
            any(
                latency[j] <= latency[i]
                and accuracy[j] >= accuracy[i]
                and (latency[j] < latency[i] or accuracy[j] > accuracy[i])
                for j in range(n)
            )
            for i in range(n)
        ]
        assert list(comparison.pareto_front(latency, accuracy)) == [not b for b in beaten]


def test_when_only_the_fine_tuned_model_is_best_it_is_recommended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_evaluation(tmp_path, "model", 198, 0.99)
    for key, n_right in (("a", 150), ("b", 160), ("c", 170)):
        write_evaluation(tmp_path, key, n_right, 0.9)
    params = study_params(model="b")
    table = comparison.comparison_table(params)
    summary = comparison.summary(table, params)
    assert summary["tied_with_best"] == "" and summary["recommended"] == "b"
    assert "only its fine-tuned model reaches the best (model" in summary["recommended_reason"]


def test_a_row_scored_on_other_images_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlpipe.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    for key in ("a", "b", "c", "model"):
        write_evaluation(tmp_path, key, 190, 0.9)
    predictions = tmp_path / "reports/evaluation/a/predictions.csv"
    predictions.write_text(predictions.read_text().replace("img7.jpg", "elsewhere.jpg"))
    # All tie, so a (first by name) is the best row every other row is paired with.
    with pytest.raises(PipelineError, match=r"evaluation/b/predictions.csv and .*evaluation/a/predictions.csv scored"):
        comparison.comparison_table(study_params())


def test_aggregate_names_the_missing_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlpipe.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"reports/evaluation/x/metrics.json is missing"):
        comparison.comparison_table(
            {"model": "x", "backbones": {"x": {"arch": "VGG16", "image_size": 32, "weights": None}}}
        )
