"""`dvc repro` sees a change in the data that `data.url` points at, not only a change of the URL.

data.url names a local image folder outside the project. fetch runs on every repro and leaves
data/raw/dataset.zip untouched when the folder is unchanged, so DVC skips prepare; when the folder
changed, the archive changes and prepare reruns. Each test builds its own throwaway project.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import dvc, make_project, stages_run
from tests.synthetic import encode, synthetic_image

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses

CLASSES = ("birds", "cats", "dogs")
N_TRAIN, N_TEST = 12, 4  # enough per class for prepare's validation split and minimum counts


def write_image_folder(root: Path, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """root/{train,validation}/<class>/<class>.<n>.jpg, small synthetic images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", N_TRAIN), ("validation", N_TEST)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                (folder / f"{name}.{n}.jpg").write_bytes(encode(synthetic_image(index, rng, size=24)))
    return root


def project_on_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A project whose data.url is a plain path to an image folder, after a first `dvc repro prepare`."""
    folder = write_image_folder(tmp_path / "images")
    project = make_project(
        tmp_path / "project",
        {
            "data": {"url": str(folder), "sha256": None},
            "backbones": {"mobilenet": {"arch": "MobileNetV2", "image_size": 32, "weights": None}},
            "model": "mobilenet",
        },
    )
    first = repro_prepare(project)
    assert "prepare" in stages_run(first), first
    return project, folder


def repro_prepare(project: Path) -> str:
    result = dvc(project, "repro", "prepare")
    return result.stdout + result.stderr


def classes(project: Path) -> list[str]:
    return json.loads((project / "data/prepared/classes.json").read_text())


def manifest(project: Path) -> list[dict[str, str]]:
    with (project / "data/prepared/manifest.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_unchanged_folder_reruns_only_fetch(tmp_path: Path) -> None:
    project, _ = project_on_folder(tmp_path)
    archive = project / "data/raw/dataset.zip"
    archive_bytes = archive.read_bytes()
    lock = (project / "dvc.lock").read_text()
    prepared = (project / "data/prepared/manifest.csv").read_bytes()

    output = repro_prepare(project)

    ran = stages_run(output)
    assert "fetch" in ran and "prepare" not in ran, output
    assert "Stage 'prepare' didn't change, skipping" in output
    assert "fetch: unchanged:" in output
    assert archive.read_bytes() == archive_bytes
    assert (project / "data/prepared/manifest.csv").read_bytes() == prepared
    # Nothing fetch records changes when nothing changed, so dvc.lock is not rewritten differently.
    assert (project / "dvc.lock").read_text() == lock


def test_deleting_a_class_folder_reruns_prepare(tmp_path: Path) -> None:
    project, folder = project_on_folder(tmp_path)
    assert classes(project) == list(CLASSES)
    for split in ("train", "validation"):
        shutil.rmtree(folder / split / "birds")

    output = repro_prepare(project)

    assert {"fetch", "prepare"} <= stages_run(output), output
    assert "fetch: updated:" in output
    assert classes(project) == ["cats", "dogs"]
    assert {row["label"] for row in manifest(project)} == {"cats", "dogs"}


def test_added_images_rerun_prepare(tmp_path: Path) -> None:
    project, folder = project_on_folder(tmp_path)
    before = manifest(project)
    rng = np.random.default_rng(1)
    for n in range(N_TRAIN, N_TRAIN + 3):
        (folder / "validation" / "cats" / f"cats.{n}.jpg").write_bytes(encode(synthetic_image(1, rng, size=24)))

    output = repro_prepare(project)

    assert "prepare" in stages_run(output), output
    after = manifest(project)
    assert len(after) == len(before) + 3
    assert sum(row["label"] == "cats" and row["split"] == "test" for row in after) == N_TEST + 3
    assert classes(project) == list(CLASSES)
