"""Stage evaluate_model: score the shipped models/model.keras end to end on the test images (from files).

Uses the same code path as `tl-predict` (tlpipe/prediction.py), so the score is what users get. Writes
metrics/model.json (the per-backbone keys plus `backbone`; `shipped`, fine-tuned or frozen, and
`shipped_reason`; and the paired test against the frozen row of the same backbone: `frozen_*` and
`fine_tuning`) and reports/evaluation/model/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from tlpipe.datasets import read_classes, read_manifest, scored_test_rows
from tlpipe.errors import PipelineError, stage_main
from tlpipe.evaluation import fine_tuning_line, headline, paired_against, write_evaluation
from tlpipe.files import read_json
from tlpipe.params import load_params
from tlpipe.paths import SHIPPED_LABELS, SHIPPED_MODEL, SHIPPED_NAME, evaluation_dir
from tlpipe.prediction import class_difference, load_classifier, predict_with_progress, read_calibration


@stage_main
def main() -> None:
    params = load_params()
    classes = read_classes()
    classifier = load_classifier(SHIPPED_MODEL)
    if classifier.labels != classes:
        raise PipelineError(f"{SHIPPED_MODEL} {class_difference(classifier.labels, classes)}; rerun dvc repro")
    test_rows, _ = scored_test_rows(read_manifest())
    started = time.perf_counter()
    predictions = predict_with_progress(classifier, [Path(p) for p in test_rows["path"]])
    seconds = time.perf_counter() - started
    failed = [p for p in predictions if p.error]
    if failed:
        raise PipelineError(f"{len(failed)} test images failed, first {failed[0].path}: {failed[0].error}")
    probabilities = np.array([p.probabilities for p in predictions])
    y_true = test_rows["label_index"].to_numpy()
    key, stats = params["model"], params["stats"]
    # Did fine-tuning help? The same paired test aggregate runs, against the frozen row of the same backbone.
    frozen = paired_against(
        evaluation_dir(key) / "predictions.csv", list(test_rows["path"]), y_true, probabilities, stats
    )
    scores = write_evaluation(
        SHIPPED_NAME,
        list(test_rows["path"]),
        y_true,
        probabilities,
        classes,
        {
            "params": int(classifier.model.count_params()),
            "images_per_second": round(len(predictions) / seconds, 1),
            "backbone": key,
        }
        | shipped_what(SHIPPED_LABELS)
        | frozen,
        stats,
        params["seed"],
        read_calibration(SHIPPED_MODEL),
    )
    print(f"model ({key} fine-tuned): {headline(scores)}", file=sys.stderr)
    print(f"model against frozen {key}: {fine_tuning_line(frozen, stats['alpha'])}", file=sys.stderr)
    print(f"model: {scores['shipped_reason']}", file=sys.stderr)


def shipped_what(labels_path: Path) -> dict[str, str]:
    """`shipped` (fine-tuned, or the frozen base and head) and why, from the shipped labels.json."""
    labels = read_json(labels_path)
    fine_tuned = labels.get("fine_tuned", True)  # models shipped before the choice existed were fine-tuned
    return {
        "shipped": "fine-tuned" if fine_tuned else "frozen",
        "shipped_reason": labels.get("shipped_reason", "fine-tuned (shipped before the reason was recorded)"),
    }


if __name__ == "__main__":
    main()
