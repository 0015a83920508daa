"""Stage evaluate_model: score the shipped models/model.keras end to end on the test images (from files).

Uses the same code path as `tl-predict` (stages/predict.py), so the score is what users get. Writes
metrics/model.json (the per-backbone keys plus `backbone`) and reports/evaluation/model/.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import SHIPPED_MODEL, PipelineError, stage_main
from stages.datasets import read_classes, read_manifest, split_rows
from stages.evaluate import write_evaluation
from stages.params import load_params
from stages.predict import Prediction, load_classifier, predict_files
from stages.progress import bar


def class_difference(labels: list[str], classes: list[str]) -> str:
    """How the model's classes differ from the data's, short enough for one line with hundreds of classes."""
    if len(labels) != len(classes):
        return f"was trained on {len(labels)} classes, the data has {len(classes)}"
    index = next(i for i, (label, name) in enumerate(zip(labels, classes)) if label != name)
    return f"was trained on other classes: its class {index} is {labels[index]!r}, the data's is {classes[index]!r}"


def predict_with_progress(model: Any, labels: list[str], paths: list[Path]) -> list[Prediction]:
    """predict_files over `paths`, with a progress bar: a large backbone on a CPU takes minutes."""
    predictions = []
    with bar(len(paths), "evaluate_model", "img") as progress:
        for prediction in predict_files(model, labels, paths):
            predictions.append(prediction)
            progress.update()
    return predictions


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
        "model",
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
