"""Users' own data: a local folder of three classes, one grayscale and one rare, end to end: every stage of
`dvc repro`, in its order, the stages' own code in this process (tests.helpers.stages_in_process; what DVC
adds is checked by test_pipeline_e2e.py and, for a local folder, test_data_changes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import make_project, stages_in_process
from tests.synthetic import encode, synthetic_image
from tlpipe.models import class_weights

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses

CLASSES = ("apples", "kiwis", "plums")  # kiwis: grayscale; plums: rare
COUNTS = {"apples": 40, "kiwis": 40, "plums": 12}


def own_folder(root: Path) -> Path:
    """A single <class>/ tree, as users keep their images; prepare splits it into train/val/test."""
    rng = np.random.default_rng(3)
    for index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for n in range(COUNTS[name]):
            mode = "L" if name == "kiwis" else "RGB"
            (folder / f"{n:03d}.jpg").write_bytes(encode(synthetic_image(index, rng, 40, mode)))
    return root


def test_balanced_class_weights() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    assert weights == {0: 4 / 6, 1: 2.0}
    assert class_weights(np.array([0, 1]), 2, None) is None


def test_three_classes_from_a_local_folder(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "project",
        {
            "data": {"url": str(own_folder(tmp_path / "my images")), "test_fraction": 0.25},
            "backbones": {"resnet50": {"arch": "ResNet50", "image_size": 32, "weights": None}},
            "model": "resnet50",
            "train": {"class_weight": "balanced", "epochs": 40},
            "finetune": {"unfreeze": "conv5", "epochs": 1, "batch_size": 16, "patience": 1},
        },
    )
    stages_in_process(
        project,
        ("fetch",),
        ("prepare",),
        ("features", "resnet50"),
        ("train", "resnet50"),
        ("crossval", "resnet50"),
        ("audit",),
        ("evaluate", "resnet50"),
        ("finetune",),
        ("ship",),
        ("evaluate_model",),
        ("aggregate",),
    )

    report = json.loads((project / "data/prepared/report.json").read_text())
    assert report["classes"] == list(CLASSES) and report["skipped"] == []
    assert sum(report["counts"]["test"].values()) == 10 + 10 + 3
    assert len([c for c in report["converted"] if "/kiwis/" in c["path"]]) == COUNTS["kiwis"]

    for name in ("resnet50", "model"):
        metrics = json.loads((project / f"metrics/{name}.json").read_text())
        assert metrics["n_test"] == 23
        assert metrics["accuracy"] >= 0.7, (name, metrics)  # chance is 0.43 (the majority class)
        assert 0.0 <= metrics["recall"] <= 1.0 and 0.5 < metrics["roc_auc"] <= 1.0
        confusion = json.loads((project / f"reports/evaluation/{name}/confusion.json").read_text())
        assert {r["actual"] for r in confusion} == set(CLASSES)
        roc = json.loads((project / f"reports/evaluation/{name}/roc.json").read_text())
        assert {r["class"] for r in roc} == set(CLASSES)  # one-vs-rest: one curve per class
        errors = pd.read_csv(project / f"reports/evaluation/{name}/predictions.csv")
        assert set(errors["actual"]) == set(CLASSES)
        for picture in ("confusion.png", "roc.png", "errors.png"):
            assert (project / f"reports/evaluation/{name}/{picture}").read_bytes()[:4] == b"\x89PNG", picture
    for picture in ("reports/training/resnet50.png", "reports/training/model.png", "reports/comparison.png"):
        assert (project / picture).read_bytes()[:4] == b"\x89PNG", picture
    assert json.loads((project / "models/labels.json").read_text())["classes"] == list(CLASSES)
