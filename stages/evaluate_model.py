"""Stage evaluate_model: score the shipped models/model.keras end to end on the test images (from files).

Uses the same code path as `tl-predict` (tlpipe/prediction.py), so the score is what users get. Writes
metrics/model.json (the per-backbone keys plus `backbone`) and reports/evaluation/model/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from tlpipe.datasets import read_classes, read_manifest, split_rows
from tlpipe.errors import PipelineError, stage_main
from tlpipe.evaluation import write_evaluation
from tlpipe.params import load_params
from tlpipe.paths import SHIPPED_MODEL, SHIPPED_NAME
from tlpipe.prediction import class_difference, load_classifier, predict_with_progress


@stage_main
def main() -> None:
    params = load_params()
    classes = read_classes()
    model, labels = load_classifier(SHIPPED_MODEL)
    if labels != classes:
        raise PipelineError(f"{SHIPPED_MODEL} {class_difference(labels, classes)}; rerun dvc repro")
    test_rows = split_rows(read_manifest(), "test")
    started = time.perf_counter()
    predictions = predict_with_progress(model, labels, [Path(p) for p in test_rows["path"]])
    seconds = time.perf_counter() - started
    failed = [p for p in predictions if p.error]
    if failed:
        raise PipelineError(f"{len(failed)} test images failed, first {failed[0].path}: {failed[0].error}")
    probabilities = np.array([p.probabilities for p in predictions])
    key = params["model"]
    scores = write_evaluation(
        SHIPPED_NAME,
        list(test_rows["path"]),
        test_rows["label_index"].to_numpy(),
        probabilities,
        classes,
        {
            "params": int(model.count_params()),
            "images_per_second": round(len(predictions) / seconds, 1),
            "backbone": key,
        },
    )
    print(f"model ({key} fine-tuned): test accuracy {scores['accuracy']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
