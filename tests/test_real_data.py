"""The real study on the shared cats_and_dogs_filtered zip with the shared ImageNet weights.

Needs ../shared (or SHARED_DIR): the zip and the VGG16 and MobileNetV2 weights; skipped, saying where they are
expected, without them. MobileNetV2 runs the whole study (2,000 training and 1,000 test images). VGG16 costs
about twenty times as much per image, more than a CI run can spend on a CPU without AVX-512, so it runs on a
fixed subset of the same zip (SUBSET images per class and split): enough to show that the shared weights load and carry ImageNet features
(random weights score near 0.6 here). Its full-data accuracy (0.979) is measured by
`python -m benchmarks.benchmark` and reported in docs/performance.md.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT, SHARED_DIR, make_project, require_shared, stages_in_process

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"
ZIP_SHA256 = "8a359a969a9a1ec775f78cc4fc6768c6d385d96d6f2556712a0f89525e920a0b"
WEIGHTS = {
    "vgg16": SHARED_DIR / "weights" / "vgg16_imagenet_notop.weights.h5",
    "mobilenet": SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5",
}
DEFAULT_BACKBONES = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["backbones"]
# Images per class taken from train/ and from validation/ for the VGG16 subset: the first ones by name.
SUBSET = {"train": 50, "validation": 50}
# MobileNetV2 on all the data; VGG16 on the subset (a twentieth of the training images, 100 test images: one
# image is 1%) must still reach the 0.93 the tutorial reported for it on all the data.
MIN_ACCURACY = {"vgg16": 0.93, "mobilenet": 0.985}


def subset_zip(source: Path, target: Path, per_split: dict[str, int]) -> Path:
    """The first `per_split[split]` images of each class of each split of `source`, as a new zip."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        chosen: dict[tuple[str, str], list[zipfile.ZipInfo]] = {}
        for info in sorted(zin.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if len(parts) == 4 and parts[1] in per_split and parts[3]:
                chosen.setdefault((parts[1], parts[2]), []).append(info)
        for (split, _), infos in sorted(chosen.items()):
            for info in infos[: per_split[split]]:
                zout.writestr(info, zin.read(info))
    return target


def real_project(root: Path, key: str, data_url: str, **backbone: object) -> Path:
    spec = DEFAULT_BACKBONES[key] | {"weights": str(WEIGHTS[key])} | backbone
    return make_project(root, {"data": {"url": data_url}, "backbones": {key: spec}, "model": key})


def stages_to_evaluate(key: str) -> list[tuple[str, ...]]:
    """The stages `dvc repro evaluate@<key>` runs, in its order."""
    return [
        ("fetch",),
        ("prepare",),
        ("features", key),
        ("train", key),
        ("crossval", key),
        ("audit",),
        ("evaluate", key),
    ]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both run their stages' own code in this process, without a TensorFlow start-up per stage; what DVC
    adds is checked by the end-to-end tests."""
    require_shared(ZIP, *WEIGHTS.values())
    root = tmp_path_factory.mktemp("real")
    # The whole study at the shipped settings (precision included), the sha256 pin checked.
    mobilenet = make_project(
        root / "mobilenet",
        {
            "data": {"url": ZIP.as_uri(), "sha256": ZIP_SHA256},
            "backbones": {"mobilenet": DEFAULT_BACKBONES["mobilenet"] | {"weights": str(WEIGHTS["mobilenet"])}},
            "model": "mobilenet",
        },
    )
    stages_in_process(mobilenet, *stages_to_evaluate("mobilenet"))
    # float32: where the CPU has no bfloat16 arithmetic, emulated bfloat16 is slower still.
    vgg16 = real_project(
        root / "vgg16", "vgg16", subset_zip(ZIP, root / "subset.zip", SUBSET).as_uri(), precision="float32"
    )
    stages_in_process(vgg16, *stages_to_evaluate("vgg16"))
    return {"mobilenet": mobilenet, "vgg16": vgg16}


def test_the_subset_holds_the_chosen_images_of_every_class(tmp_path: Path) -> None:
    require_shared(ZIP)
    with zipfile.ZipFile(subset_zip(ZIP, tmp_path / "subset.zip", SUBSET)) as archive:
        names = [name.split("/") for name in archive.namelist()]
    counts: dict[tuple[str, str], int] = {}
    for parts in names:
        counts[(parts[1], parts[2])] = counts.get((parts[1], parts[2]), 0) + 1
    assert counts == {(split, label): n for split, n in SUBSET.items() for label in ("cats", "dogs")}


@pytest.mark.parametrize("key", list(WEIGHTS))
def test_shared_weights_reach_the_target_accuracy(real_runs: dict[str, Path], key: str) -> None:
    metrics = json.loads((real_runs[key] / "metrics" / f"{key}.json").read_text())
    assert metrics["n_test"] == (1000 if key == "mobilenet" else 2 * SUBSET["validation"])
    assert metrics["accuracy"] >= MIN_ACCURACY[key], metrics


def test_temperature_scaling_does_not_worsen_calibration_on_the_real_test_split(real_runs: dict[str, Path]) -> None:
    """Fitted on the validation split, applied to the 1,000 test images it never saw."""
    metrics = json.loads((real_runs["mobilenet"] / "metrics" / "mobilenet.json").read_text())
    assert metrics["ece_calibrated"] <= metrics["ece"], metrics
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
    assert metrics["accuracy_ci_high"] - metrics["accuracy_ci_low"] < 0.02  # 1,000 images at 0.99: narrow


def test_prepare_keeps_every_real_image(real_runs: dict[str, Path]) -> None:
    report = json.loads((real_runs["mobilenet"] / "data/prepared/report.json").read_text())
    assert report["skipped"] == [] and report["classes"] == ["cats", "dogs"]
    assert sum(report["counts"]["test"].values()) == 1000


def test_the_audit_finds_the_known_duplicate_photo_and_no_leak(real_runs: dict[str, Path]) -> None:
    """train/dogs/dog.74.jpg and dog.180.jpg are one photo saved twice (same size, different bytes)."""
    import pandas as pd

    project = real_runs["mobilenet"]
    pairs = pd.read_csv(project / "reports" / "audit" / "duplicates.csv")
    names = {frozenset(Path(p).name for p in pair) for pair in zip(pairs["path_a"], pairs["path_b"])}
    assert frozenset({"dog.74.jpg", "dog.180.jpg"}) in names
    counts = json.loads((project / "metrics" / "audit.json").read_text())
    assert counts["audited_images"] == 3000 and counts["leaked_test_images"] == 0
    assert counts["label_issues_checked"] == 2000
