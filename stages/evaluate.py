"""Stage evaluate@<backbone>: score the trained head on the test split's cached features.

Writes metrics/<backbone>.json (the DVC metric) and reports/evaluation/<backbone>/ (the same scores,
the confusion records, the ROC curve, per-class scores and per-image predictions for plots and the
comparison). The temperature that calibrates the head's probabilities is fitted on the validation split's
features, or on cross-validation's out-of-fold probabilities where validation is too small to decide
(tlpipe.evaluation.held_out_calibration).
"""

from __future__ import annotations

import sys

import numpy as np

from tlpipe.datasets import read_classes, read_manifest, scored_test_rows
from tlpipe.errors import stage_main
from tlpipe.evaluation import headline, held_out_calibration, write_evaluation
from tlpipe.feature_cache import load_features, load_meta
from tlpipe.models import load_model
from tlpipe.params import load_params
from tlpipe.paths import DROPPED_TEST, head_model
from tlpipe.scoring import class_probabilities


@stage_main
def main(key: str) -> None:
    params = load_params()
    classes = read_classes()
    test_rows, kept = scored_test_rows(read_manifest())
    features = load_features(key)
    features["x_test"], features["y_test"] = features["x_test"][kept], features["y_test"][kept]
    head = load_model(head_model(key))
    probabilities = {
        split: class_probabilities(head.predict(features[f"x_{split}"].astype(np.float32), batch_size=1024, verbose=0))
        for split in ("val", "test")
    }
    meta = load_meta(key)
    scores = write_evaluation(
        key,
        list(test_rows["path"]),
        features["y_test"],
        probabilities["test"],
        classes,
        {"params": meta["params"], "images_per_second": meta["images_per_second"]} | deployment(key, meta),
        params["stats"],
        params["seed"],
        held_out_calibration(
            key,
            features["y_val"],
            probabilities["val"],
            classes,
            params["train"]["min_val_per_class"],
            params["stats"]["calibration_alpha"],
        ),
    )
    if not kept.all():
        print(
            f"{key}: {int((~kept).sum())} test images with a copy in train/val left out ({DROPPED_TEST})",
            file=sys.stderr,
        )
    print(f"{key}: {headline(scores)}", file=sys.stderr)


def deployment(key: str, meta: dict) -> dict:
    """The base's size and single-image latency (features@<key>) with the head's file: what the backbone
    costs where it ships."""
    base_bytes = meta.get("base_bytes")
    return {
        "size_bytes": None if base_bytes is None else base_bytes + head_model(key).stat().st_size,
        "latency_ms_p50": meta.get("latency_ms_p50"),
        "latency_ms_p95": meta.get("latency_ms_p95"),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.evaluate BACKBONE_KEY")
    main(sys.argv[1])
