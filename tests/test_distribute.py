"""train@<backbone> under distribute.strategy: mirrored over two logical CPU devices matches `none`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import PROJECT_ROOT, run

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses


def separable(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 32))
    x[:, :4] += np.where(y[:, None] == 1, 1.0, -1.0)
    return x.astype(np.float16), y


def features_project(root: Path, strategy: str) -> Path:
    """Just what train@toy reads: params.yaml, classes.json and cached features."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 400), ("val", 100), ("test", 400)):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = separable(n, rng)
    arrays["x_train_aug"], arrays["y_train_aug"] = np.zeros((0, 32), np.float16), np.zeros(0, np.int64)
    (root / "data/features/toy").mkdir(parents=True)
    np.savez(root / "data/features/toy/features.npz", **arrays)
    (root / "data/prepared").mkdir(parents=True)
    (root / "data/prepared/classes.json").write_text(json.dumps(["a", "b"]))
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["distribute"]["strategy"] = strategy
    # The Keras head, which the strategy trains (the linear probe has no replicas); few epochs: mirrored pays
    # per-step overhead.
    params["train"] |= {"head": "keras", "epochs": 10, "learning_rate": 0.01}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for package in ("stages", "tlpipe"):
        shutil.copytree(PROJECT_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def head_accuracy(project: Path) -> float:
    """The saved head scored here, in the test's process: plain Keras, no replicas."""
    import keras

    head = keras.models.load_model(project / "models/toy/head.keras")
    data = np.load(project / "data/features/toy/features.npz")
    p = head.predict(data["x_test"].astype("float32"), verbose=0)[:, 0]
    return float(np.mean((p > 0.5) == data["y_test"]))


def test_mirrored_on_two_cpus_gives_the_accuracy_of_none(tmp_path: Path) -> None:
    accuracies = {}
    for strategy in ("none", "mirrored"):
        project = features_project(tmp_path / strategy, strategy)
        result = run([sys.executable, "-m", "stages.train", "toy"], project)
        if strategy == "mirrored":
            assert "training under mirrored on 2 replicas" in result.stderr
        else:  # the default says nothing about it: one line less in every log
            assert "training under" not in result.stderr
        accuracies[strategy] = head_accuracy(project)
    assert accuracies["none"] > 0.9
    assert abs(accuracies["mirrored"] - accuracies["none"]) <= 0.02, accuracies
