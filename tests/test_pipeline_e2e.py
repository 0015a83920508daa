"""End to end: `dvc repro` on a synthetic two-class zip, all five backbones randomly initialised.

One pipeline run (module fixture) is checked by several tests; the run takes a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import make_project, run, tiny_backbones
from tests.synthetic import write_dataset_zip

METRIC_KEYS = {"accuracy", "precision", "recall", "f1", "roc_auc", "loss", "n_test", "params", "images_per_second"}
TIMING_KEYS = {"images_per_second"}  # wall-clock numbers; everything else must repeat exactly


def dvc(project: Path, *args: str, check: bool = True):
    return run([sys.executable, "-m", "dvc", *args], project, check=check)


def metric_files(project: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((project / "metrics").glob("*.json"))}


def without_timing(metrics: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in values.items() if k not in TIMING_KEYS} for name, values in metrics.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    archive = write_dataset_zip(root / "synthetic.zip", n_train=30, n_test=15)
    project = make_project(
        root / "project",
        {
            "data": {"url": archive.as_uri()},
            "backbones": tiny_backbones(),
            "features": {"batch_size": 16},
            "augment": {"views": 1},
            "train": {"epochs": 40, "patience": 5},
        },
    )
    dvc(project, "repro")
    return project


def test_every_stage_writes_its_outputs(project: Path) -> None:
    keys = list(tiny_backbones())
    assert (project / "data/raw/dataset.zip").is_file()
    manifest = pd.read_csv(project / "data/prepared/manifest.csv")
    assert manifest.groupby("split").size().to_dict() == {"train": 48, "val": 12, "test": 30}
    for key in keys:
        assert (project / f"data/features/{key}/features.npz").is_file()
        assert (project / f"models/{key}/head.keras").is_file()
        metrics = json.loads((project / f"metrics/{key}.json").read_text())
        assert METRIC_KEYS <= metrics.keys(), key
        assert metrics["n_test"] == 30 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["params"] > 0
        assert json.loads((project / f"metrics/train/{key}/metrics.json").read_text())["step"] >= 0
        assert len(json.loads((project / f"reports/evaluation/{key}/confusion.json").read_text())) == 30
        assert json.loads((project / f"reports/evaluation/{key}/roc.json").read_text())
    table = pd.read_csv(project / "reports/comparison.csv")
    assert sorted(table["backbone"]) == sorted(keys)
    assert list(table["accuracy"]) == sorted(table["accuracy"], reverse=True)
    assert (project / "reports/comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| backbone" in (project / "reports/comparison.md").read_text()
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["best"] == table["backbone"][0] and set(summary["backbones"]) == set(keys)


def test_separable_classes_are_learned(project: Path) -> None:
    """Even random ResNet50/InceptionV3 features separate the synthetic colours; a broken head would not."""
    for key in ("resnet50", "inception"):
        assert json.loads((project / f"metrics/{key}.json").read_text())["accuracy"] >= 0.8, key


def test_second_repro_does_nothing(project: Path) -> None:
    result = dvc(project, "repro")
    assert "Running stage" not in result.stdout + result.stderr
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


def test_dvc_metrics_and_plots_list_every_backbone(project: Path) -> None:
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {f"metrics/{key}.json" for key in tiny_backbones()} | {"metrics/summary.json"} <= files.keys()
    plots = dvc(project, "plots", "show", "--json").stdout
    for key in tiny_backbones():
        assert f"metrics/train/{key}/plots/metrics" in plots
        assert f"reports/evaluation/{key}/confusion.json" in plots
        assert f"reports/evaluation/{key}/roc.json" in plots


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_changing_one_backbone_reruns_only_its_stages(project: Path) -> None:
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["backbones"]["resnet50"]["image_size"] = 40
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(project, "repro")
    finally:
        params_file.write_text(original)
    assert stages_run(result.stdout) == {"features@resnet50", "train@resnet50", "evaluate@resnet50", "aggregate"}
    dvc(project, "repro")  # back to the committed parameters (restored from DVC's run cache)


def test_same_inputs_give_the_same_metrics(project: Path) -> None:
    before = metric_files(project)
    dvc(project, "repro", "--force")
    after = metric_files(project)
    assert before.keys() == after.keys()
    assert without_timing(before) == without_timing(after)
