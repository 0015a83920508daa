"""Stage audit: duplicates, train/test leakage, likely label errors and outliers, from one backbone's cached
features (params.yaml `audit.backbone`; null: `model`'s) and its out-of-fold probabilities
(reports/crossval/<backbone>/).

Writes:
  metrics/audit.json              the counts (a DVC metric: `dvc metrics diff` shows what changed)
  reports/audit/duplicates.csv    every exact (same bytes) and near (cosine >= threshold) duplicate pair
  reports/audit/leakage.csv       the pairs joining a test image to a train or val image
  reports/audit/label_issues.csv  train/val images, most likely mislabelled first, with cleanlab's flag
  reports/audit/outliers.csv      every image, least like the training images first
  reports/audit/*.png             picture grids of the first of each list
  data/audit/dropped_test.csv     the test images every evaluation leaves out (audit.leakage: drop; else none)

audit.leakage: fail stops after writing the reports, with one line naming the count and the first pairs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from tlpipe import audit
from tlpipe.datasets import SPLITS, read_classes, read_manifest
from tlpipe.errors import PipelineError, stage_main
from tlpipe.feature_cache import load_features
from tlpipe.files import atomic_path, write_json
from tlpipe.params import audit_backbone, load_params
from tlpipe.paths import AUDIT_DIR, AUDIT_METRICS, DROPPED_TEST, out_of_fold
from tlpipe.pictures import image_grid

SHOWN = 25  # images per picture grid: five rows of five
SHOWN_PAIRS = 12  # duplicate pairs per picture grid: four rows of three


def write_csv(table: pd.DataFrame, name: str) -> None:
    with atomic_path(AUDIT_DIR / name) as tmp:
        table.to_csv(tmp, index=False)


def features_in_order(key: str) -> np.ndarray:
    """The cached features in audit.Images' order (SPLITS, each in manifest order)."""
    features = load_features(key)
    return np.concatenate([features[f"x_{split}"] for split in SPLITS])


def duplicates_grid(pairs: pd.DataFrame, classes: list[str]) -> None:
    """Pairs side by side, three to a row: those across splits (leakage) first."""
    across = pairs["split_a"] != pairs["split_b"]
    shown = pd.concat([pairs[across], pairs[~across]]).head(SHOWN_PAIRS)
    paths, captions = [], []
    for pair in shown.itertuples(index=False):
        for side in ("a", "b"):
            paths.append(getattr(pair, f"path_{side}"))
            captions.append(
                (getattr(pair, f"split_{side}"), getattr(pair, f"label_{side}"), pair.kind, pair.similarity)
            )
    image_grid(
        paths,
        lambda i, names: f"{captions[i][0]} {names[captions[i][1]]}\n{captions[i][2]} {captions[i][3]:.3f}",
        classes,
        f"Duplicate pairs (left, right): {len(pairs)}, {int(across.sum())} across splits",
        "no duplicates found",
        AUDIT_DIR / "duplicates.png",
    )


def label_issues_grid(issues: pd.DataFrame, classes: list[str]) -> None:
    shown = issues.head(SHOWN).reset_index(drop=True)
    image_grid(
        list(shown["path"]),
        lambda i, names: (
            f"given {names[shown['given_label'][i]]}\nsuggested {names[shown['suggested_label'][i]]} "
            f"({shown['suggested_probability'][i]:.2f})"
        ),
        classes,
        f"Labels most likely wrong: {int(issues['is_label_issue'].sum())} flagged by cleanlab, "
        f"the first {len(shown)} of {len(issues)} ranked",
        "no labelled images were checked",
        AUDIT_DIR / "label_issues.png",
        columns=5,
    )


def outliers_grid(outliers: pd.DataFrame, classes: list[str]) -> None:
    shown = outliers.head(SHOWN).reset_index(drop=True)
    image_grid(
        list(shown["path"]),
        lambda i, names: f"{shown['split'][i]} {names[shown['label'][i]]}\nscore {shown['outlier_score'][i]:.3f}",
        classes,
        "Least like the training images (cleanlab out-of-distribution score, low = unusual)",
        "no images",
        AUDIT_DIR / "outliers.png",
        columns=5,
    )


def audit_duplicates(
    images: audit.Images, unit: np.ndarray, classes: list[str], settings: dict[str, Any], notes: list[str]
) -> tuple[audit.Duplicates, pd.DataFrame]:
    """Find and write the duplicate pairs; return them and the pairs that leak a test image."""
    duplicates = audit.find_duplicates(images, unit, images.digests, settings["near_duplicate_threshold"], classes)
    listed = len(duplicates.pairs) - duplicates.counts["exact_duplicate_pairs"]
    if listed < duplicates.counts["near_duplicate_pairs"]:
        notes.append(
            f"audit.near_duplicate_threshold {settings['near_duplicate_threshold']} matches "
            f"{duplicates.counts['near_duplicate_pairs']} pairs; duplicates.csv lists each image's "
            f"{audit.MAX_PAIRS_PER_IMAGE} most similar (raise the threshold to see them all)"
        )
    leaks = audit.leaked_pairs(duplicates.pairs)
    write_csv(duplicates.pairs, "duplicates.csv")
    write_csv(leaks, "leakage.csv")
    duplicates_grid(duplicates.pairs, classes)
    return duplicates, leaks


def audit_labels(key: str, images: audit.Images, classes: list[str], notes: list[str]) -> tuple[pd.DataFrame, int]:
    """Rank and write the likely label errors of the train and val images that cross-validation scored out of
    fold; return them and how many were checked."""
    labelled = images.subset(images.splits != "test")
    probabilities = audit.out_of_fold_probabilities(pd.read_csv(out_of_fold(key)), labelled, classes, out_of_fold(key))
    checked = 0
    if probabilities is None:
        issues = pd.DataFrame(columns=audit.LABEL_ISSUE_COLUMNS)
        notes.append(f"label issues not searched: crossval@{key} could not fold the train and val images")
    else:
        scored = ~np.isnan(probabilities).any(axis=1)  # classes too small to fold have no probabilities
        if not scored.all():
            notes.append(
                f"label issues: {int((~scored).sum())} images of classes with one train+val image were not "
                f"checked (crossval@{key} could not fold them)"
            )
        issues = audit.label_issues(labelled.subset(scored), probabilities[scored], classes)
        checked = int(scored.sum())
    write_csv(issues, "label_issues.csv")
    label_issues_grid(issues, classes)
    return issues, checked


@stage_main
def main() -> None:
    params = load_params()
    settings = params["audit"]
    key = audit_backbone(params)
    started = time.perf_counter()
    classes = read_classes()
    images = audit.Images.from_manifest(read_manifest())
    unit = audit.unit_rows(features_in_order(key))
    if len(unit) != len(images):
        raise PipelineError(f"data/features/{key} has {len(unit)} images, the manifest {len(images)}; rerun dvc repro")
    notes = []
    if params["backbones"][key]["weights"] is None:
        notes.append(
            f"backbones.{key} has random weights (weights: null): its features make poor evidence of duplicates "
            "and outliers; audit a backbone with ImageNet weights"
        )

    duplicates, leaks = audit_duplicates(images, unit, classes, settings, notes)
    issues, checked = audit_labels(key, images, classes, notes)
    outliers = audit.outlier_table(images, audit.outlier_scores(unit, images.splits == "train"), classes)
    write_csv(outliers, "outliers.csv")
    outliers_grid(outliers, classes)

    dropped = []
    if settings["leakage"] == "drop":
        dropped = [path for path, leaked in zip(images.paths, duplicates.leaked) if leaked]
    with atomic_path(DROPPED_TEST) as tmp:
        pd.DataFrame({"path": dropped}).to_csv(tmp, index=False)
    counts = {
        "audited_images": len(images),
        **duplicates.counts,
        "dropped_test_images": len(dropped),
        "label_issues": int(issues["is_label_issue"].sum()),
        "label_issues_checked": checked,
    }
    write_json(AUDIT_METRICS, counts)

    for note in notes:
        print(f"audit: {note}", file=sys.stderr)
    leaked = counts["leaked_test_images"]
    print(
        f"audit ({key} features, {len(images)} images, {time.perf_counter() - started:.1f} s): "
        f"{counts['exact_duplicate_pairs']} exact and {counts['near_duplicate_pairs']} near duplicate pairs, "
        f"{leaked} test images with a copy in train/val{' (dropped from every evaluation)' if dropped else ''}, "
        f"{counts['label_issues']} likely label errors -> {AUDIT_DIR}/",
        file=sys.stderr,
    )
    if leaked and settings["leakage"] == "fail":
        raise PipelineError(audit.leakage_failure(leaks, leaked))


if __name__ == "__main__":
    main()
