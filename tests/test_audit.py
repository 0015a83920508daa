"""The data audit (tlpipe.audit, stages/audit.py) on synthetic features: every search against a brute-force
computation, and the stage itself, in process, on a small prepared project with planted problems."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.helpers import PROJECT_ROOT, stages_in_process
from tlpipe import audit
from tlpipe.datasets import scored_test_rows
from tlpipe.errors import PipelineError
from tlpipe.files import sha256_file
from tlpipe.params import audit_backbone, validate
from tlpipe.paths import out_of_fold

DEFAULTS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def brute_force(unit: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair i < j with cosine >= threshold, from the whole similarity matrix at once."""
    similarity = unit.astype(np.float64) @ unit.T.astype(np.float64)
    i, j = np.nonzero(np.triu(similarity >= threshold - 1e-6, k=1))
    return set(zip(i.tolist(), j.tolist()))


def clustered(n: int, dim: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Non-negative features like pooled ReLU activations: distinct images score well below 0.9."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(size=(n, dim)) * spread).astype(np.float32)


def test_blocked_search_finds_exactly_the_pairs_a_brute_force_search_finds() -> None:
    rng = np.random.default_rng(0)
    x = clustered(300, 64, seed=1)
    # Planted copies, across every block boundary: slightly perturbed, so cosines fall between 0.9 and 1.
    sources, copies = rng.choice(150, 20, replace=False), rng.choice(np.arange(150, 300), 20, replace=False)
    x[copies] = x[sources] + rng.normal(scale=0.1, size=(20, 64)).astype(np.float32)
    unit = audit.unit_rows(x)
    splits = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    expected = brute_force(unit, 0.9)
    assert len(expected) >= 20

    found = audit.similar_pairs(unit, splits, 0.9, block_rows=7)

    assert set(zip(found.i.tolist(), found.j.tolist())) == expected
    assert found.pairs == len(expected)
    assert found.across == sum(splits[i] != splits[j] for i, j in expected)
    leaked = {j for i, j in expected if splits[j] == "test" and splits[i] != "test"}
    leaked |= {i for i, j in expected if splits[i] == "test" and splits[j] != "test"}
    assert set(np.flatnonzero(found.leaked).tolist()) == leaked
    assert np.allclose(found.similarity, (unit[found.i] * unit[found.j]).sum(axis=1), atol=1e-5)


def test_a_threshold_that_matches_everything_keeps_exact_counts_and_lists_the_most_similar() -> None:
    x = clustered(120, 16, seed=2) + 20.0  # a large shared component: every pair scores near 1
    unit = audit.unit_rows(x)
    splits = np.array(["train"] * 80 + ["test"] * 40)

    found = audit.similar_pairs(unit, splits, 0.5, block_rows=32)

    assert found.pairs == 120 * 119 // 2 and found.across == 80 * 40
    assert found.leaked.tolist() == [False] * 80 + [True] * 40
    per_image = np.bincount(found.i, minlength=120)
    assert per_image.max() == audit.MAX_PAIRS_PER_IMAGE
    similarity = unit @ unit.T
    for i in (0, 50):  # the kept partners are the most similar later images
        later = np.arange(i + 1, 120)
        best = set(later[np.argsort(-similarity[i, later], kind="stable")[: audit.MAX_PAIRS_PER_IMAGE]].tolist())
        assert set(found.j[found.i == i].tolist()) == best


def test_exact_pairs_are_every_two_files_with_the_same_bytes() -> None:
    i, j = audit.exact_pairs(["a", "b", "a", "c", "a", "b"])
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 4), (1, 5), (2, 4)]


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    paths = []
    for index, content in enumerate([b"x" * 3_000_000, b"y", b"x" * 3_000_000]):
        (tmp_path / f"{index}.bin").write_bytes(content)
        paths.append(str(tmp_path / f"{index}.bin"))
    digests = [sha256_file(path) for path in paths]
    assert digests == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def write_images(folder: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        path = folder / f"{seed}-{index}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_duplicates_separate_exact_from_near_and_flag_the_test_images_they_leak(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 8, seed=3)
    shutil.copy(paths[0], paths[6])  # exact: train image 0 and test image 6
    images = audit.Images(
        paths, np.array(["train", "train", "train", "val", "val", "test", "test", "test"]), np.zeros(8, np.int64)
    )
    x = clustered(8, 32, seed=4)
    x[6] = x[0]
    x[7] = x[3] * 1.02 + 0.01  # near: val image 3 and test image 7
    x[2] = x[1] + 0.01  # near, within train
    found = audit.find_duplicates(images, audit.unit_rows(x), [sha256_file(p) for p in paths], 0.95, ["cats"])

    assert found.counts == {
        "exact_duplicate_pairs": 1,
        "exact_duplicate_pairs_across_splits": 1,
        "near_duplicate_pairs": 2,
        "near_duplicate_pairs_across_splits": 1,
        "leaked_test_images": 2,
    }
    assert found.leaked.tolist() == [False] * 6 + [True, True]
    assert list(found.pairs["kind"]) == ["exact", "near", "near"]
    leaks = audit.leaked_pairs(found.pairs)
    assert sorted(leaks["test_path"]) == [paths[6], paths[7]]
    assert set(leaks["match_path"]) == {paths[0], paths[3]}
    line = audit.leakage_failure(leaks, 2)
    assert "\n" not in line and line.startswith("audit.leakage is fail and 2 test images") and paths[6] in line


def test_label_issues_rank_the_flipped_labels_first() -> None:
    rng = np.random.default_rng(5)
    truth = np.repeat([0, 1, 2], 40)
    probabilities = np.full((120, 3), 0.05)
    probabilities[np.arange(120), truth] = 0.9
    probabilities += rng.uniform(0, 0.05, size=(120, 3))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    given = truth.copy()
    flipped = np.array([3, 45, 90, 100])
    given[flipped] = (truth[flipped] + 1) % 3
    images = audit.Images([f"img{i}.png" for i in range(120)], np.array(["train"] * 120), given)

    issues = audit.label_issues(images, probabilities, ["a", "b", "c"])

    assert set(issues["path"][:4]) == {f"img{i}.png" for i in flipped}
    assert issues["is_label_issue"][:4].all() and not issues["is_label_issue"][4:].any()
    positions = [int(path[3:-4]) for path in issues["path"][:4]]
    assert list(issues["suggested_label"][:4]) == [["a", "b", "c"][truth[i]] for i in positions]
    assert issues["label_quality"][:4].max() < issues["label_quality"][4:].min()


def test_outlier_scores_put_the_image_unlike_any_training_image_last() -> None:
    x = clustered(60, 32, seed=6) + 3.0
    x[55] = 0.0
    x[55, :2] = 10.0  # a drawing among photos: its own direction
    is_train = np.arange(60) < 40
    scores = audit.outlier_scores(audit.unit_rows(x), is_train)
    assert scores.shape == (60,) and int(np.argmin(scores)) == 55
    assert scores[55] < 0.5 * np.median(scores)


def test_the_audit_parameters_are_checked_before_any_work() -> None:
    params = json.loads(json.dumps(DEFAULTS))
    params["audit"] |= {"backbone": "vit", "near_duplicate_threshold": 0, "leakage": "ignore"}
    problems = validate(params)
    assert any(p.startswith("audit.backbone: 'vit' is not a backbone; use one") for p in problems)
    assert "audit.near_duplicate_threshold: must be in (0.0, 1.0], got 0" in problems
    assert any(p.startswith("audit.leakage: must be one of report, drop, fail") for p in problems)
    params["audit"] |= {"backbone": "vgg16", "near_duplicate_threshold": 1.0, "leakage": "drop"}
    assert validate(params) == []
    params["audit"]["near_duplicate_threshold"] = 1.5
    assert validate(params) == ["audit.near_duplicate_threshold: must be in (0.0, 1.0], got 1.5"]


def test_audit_backbone_null_follows_model_and_a_set_one_must_be_a_backbone() -> None:
    params = json.loads(json.dumps(DEFAULTS))
    assert params["audit"]["backbone"] is None and validate(params) == []
    assert audit_backbone(params) == params["model"]
    params["backbones"] = {"small": params["backbones"]["mobilenet"]}
    params["model"] = "small"
    assert validate(params) == [] and audit_backbone(params) == "small"  # no second edit
    params["audit"]["backbone"] = "mobilenet"  # an older params.yaml's value, its backbone gone
    assert validate(params) == [
        "audit.backbone: 'mobilenet' is not a backbone; use one whose features are cached: small"
    ]
    params["backbones"]["mobilenet"] = params["backbones"]["small"]
    assert validate(params) == [] and audit_backbone(params) == "mobilenet"  # set: it wins over model


def test_scored_test_rows_leave_out_what_the_audit_dropped(tmp_path: Path) -> None:
    manifest = pd.DataFrame(
        {"path": ["a", "b", "c", "d"], "label": ["x"] * 4, "split": ["train", "test", "test", "test"]}
    )
    dropped = tmp_path / "dropped.csv"
    dropped.write_text("path\nc\n")
    rows, kept = scored_test_rows(manifest, dropped)
    assert list(rows["path"]) == ["b", "d"] and kept.tolist() == [True, False, True]
    dropped.write_text("path\nb\nc\nd\n")
    with pytest.raises(PipelineError, match="leaves no test image to score"):
        scored_test_rows(manifest, dropped)
    with pytest.raises(PipelineError, match=r"dropped_test.csv is missing; run dvc repro audit"):
        scored_test_rows(manifest, tmp_path / "dropped_test.csv")


# --- the stage, in process, on a small prepared project -----------------------------------------------------

CLASSES = ["cats", "dogs"]
PER_CLASS = {"train": 12, "val": 4, "test": 6}
FLIPPED = (2, 15)  # training images (in cache order) whose labels the project gets wrong


def prepared_project(root: Path, per_class: dict[str, int] = PER_CLASS, **audit_settings: object) -> Path:
    """What prepare, features@k and crossval@k would leave: images, manifest, cached features, out-of-fold
    probabilities; test image 0 a byte copy of training image 0, test image 1 a near copy of val image 0."""
    params = json.loads(json.dumps(DEFAULTS))
    params["backbones"] = {"k": {"arch": "MobileNetV2", "image_size": 32, "weights": None}}
    params["model"] = "k"
    params["audit"] |= {"backbone": "k", **audit_settings}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = root / "data" / "prepared"
    rows, features, labels = [], [], []
    rng = np.random.default_rng(7)
    for split in ("train", "val", "test"):
        for label, name in enumerate(CLASSES):
            for path in write_images(prepared / "images" / split / name, per_class[split], seed=len(rows) + 1):
                rows.append({"path": str(Path(path).relative_to(root)), "label": name, "split": split})
                features.append(np.abs(rng.normal(size=32)).astype(np.float32))
                labels.append(label)
    manifest = pd.DataFrame(rows)
    (prepared / "classes.json").write_text(json.dumps(CLASSES))
    x, y, split_of = np.array(features), np.array(labels), manifest["split"].to_numpy()
    first = {split: int(np.flatnonzero(split_of == split)[0]) for split in ("train", "val", "test")}
    shutil.copy(root / rows[first["train"]]["path"], root / rows[first["test"]]["path"])
    manifest["sha256"] = [sha256_file(root / path) for path in manifest["path"]]  # as prepare writes it
    manifest.to_csv(prepared / "manifest.csv", index=False)
    x[first["test"]] = x[first["train"]]
    x[first["test"] + 1] = x[first["val"]] * 1.01
    arrays = {f"x_{s}": x[split_of == s] for s in ("train", "val", "test")} | {
        f"y_{s}": y[split_of == s] for s in ("train", "val", "test")
    }
    arrays |= {"x_train_aug": np.zeros((0, 32), np.float32), "y_train_aug": np.zeros(0, np.int64)}
    (root / "data" / "features" / "k").mkdir(parents=True)
    np.savez(root / "data" / "features" / "k" / "features.npz", **arrays)
    labelled = manifest[manifest["split"] != "test"].reset_index(drop=True)
    given = labelled["label"].map(CLASSES.index).to_numpy()
    truth = given.copy()
    flipped = [i for i in FLIPPED if i < len(truth)]
    truth[flipped] = 1 - truth[flipped]
    table = labelled[["path", "split"]].assign(actual=labelled["label"])
    table["probability_cats"] = np.where(truth == 0, 0.95, 0.05) + rng.uniform(0, 0.03, len(truth))
    table["probability_dogs"] = 1 - table["probability_cats"]
    (root / "reports" / "crossval" / "k").mkdir(parents=True)
    table.to_csv(root / "reports" / "crossval" / "k" / "out_of_fold.csv", index=False)
    return root


def planted_leaks(project: Path) -> list[str]:
    """The first two test images: the planted exact and near copies."""
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    return list(manifest[manifest["split"] == "test"]["path"][:2])


def test_the_audit_stage_reports_planted_leaks_label_errors_and_outliers(tmp_path: Path) -> None:
    project = prepared_project(tmp_path)
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 0, err
    counts = json.loads((project / "metrics" / "audit.json").read_text())
    assert counts["audited_images"] == 44 and counts["label_issues_checked"] == 32
    assert counts["exact_duplicate_pairs_across_splits"] >= 1 and counts["leaked_test_images"] == 2
    assert counts["dropped_test_images"] == 0
    assert pd.read_csv(project / "data" / "audit" / "dropped_test.csv")["path"].tolist() == []
    leaks = pd.read_csv(project / "reports" / "audit" / "leakage.csv")
    assert set(leaks["test_path"]) == set(planted_leaks(project))
    issues = pd.read_csv(project / "reports" / "audit" / "label_issues.csv")
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    assert set(issues["path"][:2]) == set(manifest["path"][list(FLIPPED)]) and counts["label_issues"] == 2
    outliers = pd.read_csv(project / "reports" / "audit" / "outliers.csv")
    assert len(outliers) == 44 and outliers["outlier_score"].is_monotonic_increasing
    for picture in ("duplicates.png", "label_issues.png", "outliers.png"):
        assert (project / "reports" / "audit" / picture).stat().st_size > 1000
    assert "random weights" in err and "2 test images with a copy in train/val" in err


def test_audit_backbone_null_reads_the_features_of_model(tmp_path: Path) -> None:
    """Two backbones' features and out-of-fold probabilities are cached; the audit reads model's."""
    project = prepared_project(tmp_path, backbone=None)
    shutil.copytree(project / "data/features/k", project / "data/features/j")
    shutil.copytree(project / "reports/crossval/k", project / "reports/crossval/j")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["backbones"]["j"] = params["backbones"]["k"]
    for model in ("k", "j"):
        (project / "params.yaml").write_text(yaml.safe_dump(params | {"model": model}))
        code, err = stages_in_process(project, ("audit",), check=False)
        assert code == 0 and f"audit ({model} features, 44 images" in err, err
    (project / "data/features/j/features.npz").unlink()  # model's features, not the other's, are read
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 1 and "data/features/j" in err, err


def test_leakage_drop_leaves_the_leaked_test_images_out_of_every_evaluation(tmp_path: Path) -> None:
    project = prepared_project(tmp_path, leakage="drop")
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 0, err
    dropped = pd.read_csv(project / "data" / "audit" / "dropped_test.csv")["path"].tolist()
    assert dropped == planted_leaks(project)
    assert json.loads((project / "metrics" / "audit.json").read_text())["dropped_test_images"] == 2
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    rows, kept = scored_test_rows(manifest, project / "data" / "audit" / "dropped_test.csv")
    assert len(rows) == 10 and kept.tolist() == [False, False] + [True] * 10


def test_leakage_fail_stops_with_one_line_after_writing_the_reports(tmp_path: Path) -> None:
    project = prepared_project(tmp_path, leakage="fail")
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 1
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "audit.leakage is fail and 2 test images have a copy in train or val" in error[0]
    assert f"{planted_leaks(project)[0]} ~ " in error[0] and "set audit.leakage to drop" in error[0]
    assert len(pd.read_csv(project / "reports" / "audit" / "leakage.csv")) == 2


def test_a_small_dataset_folds_fewer_times_and_the_audit_still_searches_label_issues(tmp_path: Path) -> None:
    """4 train+val images per class: crossval drops to 4 folds and says so; the audit checks every label."""
    project = prepared_project(tmp_path, per_class={"train": 3, "val": 1, "test": 2})
    code, err = stages_in_process(project, ("crossval", "k"), check=False)
    assert code == 0, err
    assert "4 folds x 2 repeats of the logistic head on 8 images" in err
    assert "crossval.folds 5 lowered to 4: class 'cats' has 4 train+val images" in err
    ran = json.loads((project / "metrics" / "crossval" / "k.json").read_text())
    assert {k: ran[k] for k in ("folds", "repeats", "folds_requested", "unfolded_classes")} == {
        "folds": 4,
        "repeats": 2,
        "folds_requested": 5,
        "unfolded_classes": "",
    }
    assert 0 <= ran["cv_accuracy_mean"] <= 1
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 0, err
    assert "label issues" not in err
    counts = json.loads((project / "metrics" / "audit.json").read_text())
    assert counts["label_issues_checked"] == 8 and counts["leaked_test_images"] == 2
    assert len(pd.read_csv(project / "reports" / "audit" / "label_issues.csv")) == 8
    assert len(pd.read_csv(project / "reports" / "audit" / "outliers.csv")) == 12


def test_images_without_out_of_fold_probabilities_are_left_out_of_the_label_search_and_counted(tmp_path: Path) -> None:
    """A class too small to fold has no out-of-fold probabilities: its images are named as unchecked."""
    project = prepared_project(tmp_path)
    table = pd.read_csv(project / out_of_fold("k"))
    unfolded = table["actual"] == "dogs"
    table.loc[unfolded, ["probability_cats", "probability_dogs"]] = np.nan
    table.to_csv(project / out_of_fold("k"), index=False)
    code, err = stages_in_process(project, ("audit",), check=False)
    assert code == 0, err
    assert (
        f"audit: label issues: {int(unfolded.sum())} images of classes with one train+val image were not checked" in err
    )
    counts = json.loads((project / "metrics" / "audit.json").read_text())
    assert counts["label_issues_checked"] == int((~unfolded).sum())
    assert set(pd.read_csv(project / "reports" / "audit" / "label_issues.csv")["given_label"]) == {"cats"}
