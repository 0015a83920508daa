"""Stage evaluate@<backbone>: score the trained head on the test split's cached features.

Writes metrics/<backbone>.json (the DVC metric) and reports/evaluation/<backbone>/ (the same scores,
the confusion records, the ROC curve and per-image predictions for plots and the comparison).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pandas as pd

from stages.common import EVALUATION_DIR, FEATURES_DIR, METRICS_DIR, MODELS_DIR, atomic_path, read_json, stage_main, write_json
from stages.datasets import read_classes, read_manifest, split_rows
from stages.models import load_model
from stages.params import load_params
from stages import pictures
from stages.scoring import class_probabilities, classification_scores, confusion_matrix, confusion_records, roc_records
from stages.train import load_features


def write_evaluation(
    name: str, paths: list[str], y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the metrics file and the evaluation folder of `name` (a backbone key, or `model`)."""
    y_pred = probabilities.argmax(axis=1)
    scores = classification_scores(y_true, probabilities) | extra
    out_dir = EVALUATION_DIR / name
    roc = roc_records(y_true, probabilities, classes)
    write_json(out_dir / "confusion.json", confusion_records(y_true, y_pred, classes))
    write_json(out_dir / "roc.json", roc)
    predictions = pd.DataFrame(
        {
            "path": paths,
            "actual": [classes[i] for i in y_true],
            "predicted": [classes[i] for i in y_pred],
            "probability": probabilities.max(axis=1).round(6),
        }
    )
    with atomic_path(out_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    title = (
        f"shipped model ({extra.get('backbone')} fine-tuned)" if name == "model"
        else f"{name} (frozen base, trained head)"
    )
    pictures.confusion_matrix(confusion_matrix(y_true, y_pred, len(classes)), classes, title, out_dir / "confusion.png")
    pictures.roc_curves(roc, title, out_dir / "roc.png")
    errors = predictions[predictions["actual"] != predictions["predicted"]].sort_values("probability", ascending=False)
    pictures.misclassified_grid(errors.to_dict("records"), title, out_dir / "errors.png")
    write_json(out_dir / "metrics.json", scores)
    write_json(METRICS_DIR / f"{name}.json", scores)
    return scores


@stage_main
def main(key: str) -> None:
    load_params()
    classes = read_classes()
    test_rows = split_rows(read_manifest(), "test")
    features = load_features(key)
    head = load_model(MODELS_DIR / key / "head.keras")
    outputs = head.predict(features["x_test"].astype(np.float32), batch_size=1024, verbose=0)
    meta = read_json(FEATURES_DIR / key / "meta.json")
    scores = write_evaluation(
        key,
        list(test_rows["path"]),
        features["y_test"],
        class_probabilities(outputs),
        classes,
        {"params": meta["params"], "images_per_second": meta["images_per_second"]},
    )
    print(f"{key}: test accuracy {scores['accuracy']:.4f}, roc_auc {scores['roc_auc']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.evaluate BACKBONE_KEY")
    main(sys.argv[1])
