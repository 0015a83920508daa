"""Writing one evaluation: metrics/<name>.json (the DVC metric) and reports/evaluation/<name>/.

<name> is a backbone key (its frozen base and trained head, on cached features) or `model` (the shipped
model, end to end from files). Both go through here, so the two are scored and drawn the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tlpipe import pictures
from tlpipe.files import atomic_path, write_json
from tlpipe.paths import SHIPPED_NAME, evaluation_dir, metrics_file
from tlpipe.scoring import classification_scores, confusion_matrix, confusion_records, roc_records


def title(name: str, extra: dict[str, Any]) -> str:
    if name == SHIPPED_NAME:
        return f"shipped model ({extra.get('backbone')} fine-tuned)"
    return f"{name} (frozen base, trained head)"


def write_evaluation(
    name: str,
    paths: list[str],
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the metrics file and the evaluation folder of `name`; returns the scores."""
    y_pred = probabilities.argmax(axis=1)
    scores = classification_scores(y_true, probabilities) | extra
    out_dir = evaluation_dir(name)
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
    heading = title(name, extra)
    pictures.confusion_matrix(
        confusion_matrix(y_true, y_pred, len(classes)), classes, heading, out_dir / "confusion.png"
    )
    pictures.roc_curves(roc, heading, out_dir / "roc.png")
    errors = predictions[predictions["actual"] != predictions["predicted"]].sort_values("probability", ascending=False)
    pictures.misclassified_grid(errors.to_dict("records"), heading, out_dir / "errors.png")
    write_json(out_dir / "metrics.json", scores)
    write_json(metrics_file(name), scores)
    return scores
