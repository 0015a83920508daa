"""The real study on the shared cats_and_dogs_filtered zip with the shared ImageNet weights.

Needs ../shared (or SHARED_DIR): the zip and the VGG16 and MobileNetV2 weights. About 3 minutes on 2 cores,
most of it VGG16's forward passes (in bfloat16, as shipped).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT, SHARED_DIR, make_project, run

ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"
ZIP_SHA256 = "8a359a969a9a1ec775f78cc4fc6768c6d385d96d6f2556712a0f89525e920a0b"
WEIGHTS = {
    "vgg16": SHARED_DIR / "weights" / "vgg16_imagenet_notop.weights.h5",
    "mobilenet": SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5",
}
DEFAULT_BACKBONES = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["backbones"]
# The tutorial reported 0.93 for VGG16; the issue asks for at least these on the test split.
MIN_ACCURACY = {"vgg16": 0.975, "mobilenet": 0.985}


def real_project(root: Path) -> Path:
    missing = [p for p in [ZIP, *WEIGHTS.values()] if not p.is_file()]
    if missing:
        raise AssertionError(f"shared data missing: {missing}; set SHARED_DIR to the folder described in README.md")
    return make_project(
        root,
        {
            "data": {"url": ZIP.as_uri(), "sha256": ZIP_SHA256},
            # The shipped settings of these backbones (precision included), with the shared weights.
            "backbones": {key: DEFAULT_BACKBONES[key] | {"weights": str(weights)} for key, weights in WEIGHTS.items()},
            "model": "mobilenet",
        },
    )


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = real_project(tmp_path_factory.mktemp("real") / "project")
    run([sys.executable, "-m", "dvc", "repro", *(f"evaluate@{key}" for key in WEIGHTS)], project)
    return project


@pytest.mark.parametrize("key", list(WEIGHTS))
def test_shared_weights_reach_the_target_accuracy(real_run: Path, key: str) -> None:
    metrics = json.loads((real_run / "metrics" / f"{key}.json").read_text())
    assert metrics["n_test"] == 1000
    assert metrics["accuracy"] >= MIN_ACCURACY[key], metrics


def test_prepare_keeps_every_real_image(real_run: Path) -> None:
    report = json.loads((real_run / "data/prepared/report.json").read_text())
    assert report["skipped"] == [] and report["classes"] == ["cats", "dogs"]
