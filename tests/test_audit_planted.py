"""The data audit on real photos with planted problems: a subset of the shared zip, MobileNetV2 with the shared
ImageNet weights, and the default audit settings. The stages run in this process (tests.helpers
.stages_in_process), as `dvc repro` would run them; that evaluations rerun when the audit's list of dropped
test images changes is checked through DVC in tests/test_pipeline_changes.py.

Planted in train/ (prepare then carves val out of it, so each copy lands in train or val):
- exact copies of test images (the same bytes under another name);
- re-encoded copies of test images: JPEG quality 50, and resized to 90% of each side;
- training images moved into the other class's folder.
Every exact and re-encoded copy must be found and leak its test image; the moved images must rank first
among the likely label errors.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.helpers import SHARED_DIR, make_project, require_shared, stages_in_process

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"
WEIGHTS = SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
ROOT = "cats_and_dogs_filtered"
PER_CLASS = {"train": 40, "validation": 20}  # the first images of each class by name
COPIES = {"exact": 2, "q50": 2, "resized": 2}  # per class: test images planted in train/ this way
MOVED = 3  # per class: further training images filed under the other class
OTHER = {"cats": "dogs", "dogs": "cats"}


def reencoded(data: bytes, kind: str) -> bytes:
    if kind == "exact":
        return data
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if kind == "resized":
            image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=50 if kind == "q50" else 90)
    return out.getvalue()


def planted_zip(target: Path) -> dict[str, list[tuple[str, str]]]:
    """Write the planted subset; return what was planted: {kind: [(planted path, original path)]}, with
    paths as the manifest spells them."""
    prefix = f"data/prepared/images/{ROOT}"
    planted: dict[str, list[tuple[str, str]]] = {kind: [] for kind in [*COPIES, "moved"]}
    with zipfile.ZipFile(ZIP) as zin, zipfile.ZipFile(target, "w") as zout:
        names = sorted(n for n in zin.namelist() if n.endswith(".jpg"))
        for label in ("cats", "dogs"):
            by_split = {split: [n for n in names if n.startswith(f"{ROOT}/{split}/{label}/")] for split in PER_CLASS}
            for split, count in PER_CLASS.items():
                for name in by_split[split][:count]:
                    zout.writestr(name, zin.read(name))
            tests = iter(by_split["validation"][: PER_CLASS["validation"]])
            for kind, count in COPIES.items():
                for _ in range(count):
                    original = next(tests)
                    copy = f"{ROOT}/train/{label}/{kind}_{Path(original).name}"
                    zout.writestr(copy, reencoded(zin.read(original), kind))
                    planted[kind].append((f"data/prepared/images/{copy}", f"{prefix}{original[len(ROOT) :]}"))
            for original in by_split["train"][PER_CLASS["train"] : PER_CLASS["train"] + MOVED]:
                moved = f"{ROOT}/train/{OTHER[label]}/moved_{Path(original).name}"
                zout.writestr(moved, zin.read(original))
                planted["moved"].append((f"data/prepared/images/{moved}", label))
    return planted


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    require_shared(ZIP, WEIGHTS)
    root = tmp_path_factory.mktemp("planted")
    planted = planted_zip(root / "planted.zip")
    defaults = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    spec = defaults["backbones"]["mobilenet"] | {"weights": str(WEIGHTS)}
    project = make_project(
        root / "project",
        {"data": {"url": (root / "planted.zip").as_uri()}, "backbones": {"mobilenet": spec}, "model": "mobilenet"},
    )
    stages_in_process(
        project, ("fetch",), ("prepare",), ("features", "mobilenet"), ("crossval", "mobilenet"), ("audit",)
    )
    return project, planted


def test_every_exact_and_reencoded_copy_is_found_and_leaks_its_test_image(audited) -> None:
    project, planted = audited
    pairs = pd.read_csv(project / "reports" / "audit" / "duplicates.csv")
    found = {frozenset(pair): kind for pair, kind in zip(zip(pairs["path_a"], pairs["path_b"]), pairs["kind"])}
    for kind in COPIES:
        for copy, original in planted[kind]:
            assert found.get(frozenset((copy, original))) == ("exact" if kind == "exact" else "near"), (kind, copy)
    leaked = set(pd.read_csv(project / "reports" / "audit" / "leakage.csv")["test_path"])
    originals = {original for kind in COPIES for _, original in planted[kind]}
    assert leaked == originals
    counts = json.loads((project / "metrics" / "audit.json").read_text())
    assert counts["leaked_test_images"] == len(originals) == 12
    assert counts["exact_duplicate_pairs_across_splits"] == 4


def test_the_moved_images_rank_first_among_the_likely_label_errors(audited) -> None:
    project, planted = audited
    issues = pd.read_csv(project / "reports" / "audit" / "label_issues.csv")
    moved = {path for path, _ in planted["moved"]}
    flagged = set(issues[issues["is_label_issue"]]["path"])
    recall = len(moved & flagged) / len(moved)  # 1.0 when measured, the six ranked first
    top = set(issues["path"][: len(moved) + 2])
    assert recall == 1 and moved <= top, (recall, issues.head(10))
    by_path = issues.set_index("path")
    for path, label in planted["moved"]:
        if path in flagged:
            assert by_path.loc[path, "suggested_label"] == label


def set_leakage(project: Path, mode: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["audit"]["leakage"] = mode
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_leakage_drop_leaves_the_copies_out_and_fail_stops_with_one_line(audited) -> None:
    project, planted = audited
    set_leakage(project, "drop")
    _, stderr = stages_in_process(project, ("audit",), ("train", "mobilenet"), ("evaluate", "mobilenet"))
    assert "12 test images with a copy in train/val left out" in stderr
    assert json.loads((project / "metrics" / "mobilenet.json").read_text())["n_test"] == 40 - 12
    dropped = set(pd.read_csv(project / "data" / "audit" / "dropped_test.csv")["path"])
    assert dropped == {original for kind in COPIES for _, original in planted[kind]}

    set_leakage(project, "fail")
    code, stderr = stages_in_process(project, ("audit",), check=False)
    errors = [line for line in stderr.splitlines() if line.startswith("error: audit.leakage")]
    assert code == 1 and len(errors) == 1 and "12 test images have a copy in train or val" in errors[0], stderr
