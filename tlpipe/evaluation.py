"""Writing one evaluation: metrics/<name>.json (the DVC metric) and reports/evaluation/<name>/.

<name> is a backbone key (its frozen base and trained head, on cached features) or `model` (the shipped
model, end to end from files). Both go through here, so the two are scored and drawn the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from tlpipe import pictures, statistics
from tlpipe.errors import PipelineError
from tlpipe.files import atomic_path, write_json
from tlpipe.paths import MANIFEST, SHIPPED_NAME, evaluation_dir, metrics_file, out_of_fold
from tlpipe.scoring import (
    classification_scores,
    clipped_rows,
    confusion_matrix,
    confusion_records,
    normalised_rows,
    per_class_scores,
    roc_records,
)
from tlpipe.small_data import validation_decides


def title(name: str, extra: dict[str, Any]) -> str:
    if name == SHIPPED_NAME:
        return f"shipped model ({extra.get('backbone')} fine-tuned)"
    return f"{name} (frozen base, trained head)"


def headline(scores: dict[str, Any]) -> str:
    """One line for the log: accuracy (and top-5 accuracy) with its interval, ROC AUC, ECE before and after
    scaling."""
    auc = "undefined" if scores["roc_auc"] is None else f"{scores['roc_auc']:.4f}"
    top5 = ""
    if "top5_accuracy" in scores:
        top5 = (
            f"top-5 {scores['top5_accuracy']:.4f} [{scores['top5_accuracy_ci_low']:.4f}, "
            f"{scores['top5_accuracy_ci_high']:.4f}], "
        )
    return (
        f"test accuracy {scores['accuracy']:.4f} [{scores['accuracy_ci_low']:.4f}, {scores['accuracy_ci_high']:.4f}], "
        f"{top5}roc_auc {auc}, ECE {scores['ece']:.4f} -> {scores['ece_calibrated']:.4f} at temperature "
        f"{scores['temperature']:.3f} ({temperature_reason(scores)})"
    )


TEMPERATURE_SOURCES = {"validation": "val", "out-of-fold": "cross-validation's out-of-fold probabilities"}


def temperature_reason(calibration: dict[str, Any]) -> str:
    """Where the temperature was fitted, and why it is applied or not."""
    source = calibration.get("temperature_source", "validation")
    if source == "none":
        return "no held-out probabilities to fit it on: validation is too small and cross-validation did not run"
    fitted, p_value, on = (
        calibration["temperature_fitted"],
        calibration["temperature_p_value"],
        TEMPERATURE_SOURCES[source],
    )
    if calibration["temperature"] == 1.0 and fitted != 1.0:
        return f"fitted {fitted:.3f} on {on} is not significantly better than none: p = {p_value:.3g}"
    return f"fitted on {on}, p = {p_value:.3g} against none"


def calibration_scores(
    y_true: np.ndarray, probabilities: np.ndarray, calibrated: np.ndarray, calibration: dict[str, float]
) -> dict[str, float]:
    """ECE and Brier score as the model is (`ece`, `brier`), and after temperature scaling (`*_calibrated`,
    from `calibrated`: `probabilities` at the temperature of `calibration`, statistics.calibration)."""
    labels = list(range(probabilities.shape[1]))
    return {
        "ece": statistics.expected_calibration_error(y_true, probabilities),
        "brier": statistics.brier_score(y_true, probabilities),
        **calibration,
        "ece_calibrated": statistics.expected_calibration_error(y_true, calibrated),
        "brier_calibrated": statistics.brier_score(y_true, calibrated),
        "loss_calibrated": round(float(log_loss(y_true, clipped_rows(calibrated), labels=labels)), 6),
    }


def held_out_calibration(
    key: str,
    y_val: np.ndarray,
    val_probabilities: np.ndarray | None,
    classes: list[str],
    min_val_per_class: int,
    alpha: float,
) -> dict[str, Any]:
    """The temperature for `key`'s head (statistics.calibration), fitted on held-out probabilities: the
    validation split's (`val_probabilities`) where it decides, else cross-validation's out-of-fold ones
    (reports/crossval/<key>/); `temperature_source` says which ("none" where cross-validation wrote none:
    no temperature)."""
    if validation_decides(y_val, len(classes), min_val_per_class):
        return statistics.calibration(y_val, val_probabilities, alpha) | {"temperature_source": "validation"}
    y, probabilities = out_of_fold_rows(key, classes)
    if not len(y):
        return {"temperature": 1.0, "temperature_fitted": 1.0, "temperature_p_value": 1.0, "temperature_source": "none"}
    return statistics.calibration(y, probabilities, alpha) | {"temperature_source": "out-of-fold"}


def out_of_fold_rows(key: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the train and val images crossval@<key> scored out of fold."""
    path = out_of_fold(key)
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run dvc repro crossval@{key}") from None
    columns = [f"probability_{name}" for name in classes]
    if not set(columns) <= set(table.columns):
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(classes)))
    scored = table.dropna(subset=columns)
    labels = scored["actual"].map({name: index for index, name in enumerate(classes)}).to_numpy(dtype=np.int64)
    return labels, scored[columns].to_numpy(dtype=np.float64)


def warnings_for(name: str, y_true: np.ndarray, classes: list[str]) -> list[str]:
    """What a reader of this evaluation's numbers must know: too few images, or one class only."""
    found = []
    if len(y_true) < statistics.FEW_TEST_IMAGES:
        found.append(
            f"{name}: only {len(y_true)} test images (fewer than {statistics.FEW_TEST_IMAGES}): "
            "its confidence intervals are wide, and differences between rows rarely significant"
        )
    if len(np.unique(y_true)) < 2:
        found.append(f"{name}: {single_class_note(y_true, classes)}")
    return found


def single_class_note(y_true: np.ndarray, classes: list[str]) -> str:
    return f"ROC AUC undefined: every test image is {classes[int(y_true[0])]!r}; add images of another class"


def write_evaluation(
    name: str,
    paths: list[str],
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    extra: dict[str, Any],
    stats: dict[str, Any],
    seed: int,
    calibration: dict[str, float],
) -> dict[str, Any]:
    """Write the metrics file and the evaluation folder of `name`; returns the scores.

    `stats` is params.yaml `stats:` (interval confidence and bootstrap resamples); `calibration` is the
    temperature from the validation split (statistics.calibration): the existing keys stay uncalibrated,
    the calibrated figures have their own.
    """
    probabilities = normalised_rows(probabilities)
    y_pred = probabilities.argmax(axis=1)
    scores = classification_scores(y_true, probabilities)
    if scores["roc_auc"] is None:
        scores["roc_auc_note"] = single_class_note(y_true, classes)
    scores |= statistics.score_intervals(y_true, probabilities, stats["bootstrap"], stats["confidence"], seed)
    if note := statistics.undefined_intervals_note(y_true, classes):
        scores["intervals_note"] = note
    calibrated = statistics.apply_temperature(probabilities, calibration["temperature"])
    scores |= calibration_scores(y_true, probabilities, calibrated, calibration) | extra
    for warning in warnings_for(name, y_true, classes):
        print(f"warning: {warning}", file=sys.stderr)
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
            "probability_calibrated": calibrated.max(axis=1).round(6),
        }
    )
    with atomic_path(out_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    with atomic_path(out_dir / "per_class.csv") as tmp:
        per_class_scores(y_true, y_pred, classes).to_csv(tmp, index=False)
    heading = title(name, extra)
    pictures.confusion_matrix(
        confusion_matrix(y_true, y_pred, len(classes)), classes, heading, out_dir / "confusion.png"
    )
    pictures.roc_curves(roc, heading, out_dir / "roc.png")
    errors = predictions[predictions["actual"] != predictions["predicted"]].sort_values("probability", ascending=False)
    pictures.misclassified_grid(errors.to_dict("records"), heading, out_dir / "errors.png")
    pictures.reliability_diagram(
        statistics.reliability_bins(y_true, probabilities),
        statistics.reliability_bins(y_true, calibrated),
        (scores["ece"], scores["ece_calibrated"]),
        heading,
        out_dir / "reliability.png",
    )
    write_json(out_dir / "metrics.json", scores)
    write_json(metrics_file(name), scores)
    return scores


def correct_by_path(predictions_csv: Path) -> pd.Series:
    """Right (True) or wrong per test image, indexed by path, from an evaluation's predictions.csv."""
    try:
        table = pd.read_csv(predictions_csv, keep_default_na=False)
    except FileNotFoundError:
        raise PipelineError(f"{predictions_csv} is missing; run dvc repro to write it") from None
    return pd.Series((table["actual"] == table["predicted"]).to_numpy(), index=table["path"])


def aligned(correct: pd.Series, paths: list[str], source: Path, reference: Path) -> np.ndarray:
    """`correct` (read from `source`) in the order of `paths` (read from `reference`); refuses a pairing over
    different test images."""
    missing = [p for p in paths if p not in correct.index]
    if missing or len(correct) != len(paths):
        raise PipelineError(
            f"{source} and {reference} scored different test images ({len(correct)} and {len(paths)}, "
            f"{len(missing)} not in both); rerun dvc repro so that every evaluation uses the same test split"
        )
    return correct.loc[paths].to_numpy(dtype=bool)


def paired_against(
    frozen_csv: Path,
    paths: list[str],
    y_true: np.ndarray,
    probabilities: np.ndarray,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The shipped model against the frozen row of its backbone, on the same images: `frozen_*` keys and a
    `fine_tuning` verdict (helped, hurt, or tied: cannot be told apart)."""
    frozen = aligned(correct_by_path(frozen_csv), paths, frozen_csv, MANIFEST)
    shipped = probabilities.argmax(axis=1) == y_true
    comparison = statistics.paired_comparison(frozen, shipped, stats["confidence"])
    verdict = statistics.verdict(comparison, stats["alpha"])
    return {
        "frozen_accuracy": round(float(frozen.mean()), 6),
        "frozen_difference": comparison["difference"],
        "frozen_difference_ci_low": comparison["difference_ci_low"],
        "frozen_difference_ci_high": comparison["difference_ci_high"],
        "frozen_p_value": comparison["p_value"],
        "only_frozen_right": comparison["only_reference_right"],
        "only_model_right": comparison["only_other_right"],
        "fine_tuning": {"better": "helped", "worse": "hurt", "tied": "tied"}[verdict],
    }


def fine_tuning_line(frozen: dict[str, Any], alpha: float) -> str:
    what = {
        "helped": "fine-tuning helped",
        "hurt": "fine-tuning hurt",
        "tied": "cannot be told apart from the frozen head",
    }[frozen["fine_tuning"]]
    return (
        f"{what} (accuracy {frozen['frozen_difference']:+.4f} "
        f"[{frozen['frozen_difference_ci_low']:+.4f}, {frozen['frozen_difference_ci_high']:+.4f}], "
        f"McNemar p = {frozen['frozen_p_value']:.3g} at alpha {alpha}; {frozen['only_frozen_right']} images only "
        f"the frozen head got right, {frozen['only_model_right']} only the fine-tuned model)"
    )
