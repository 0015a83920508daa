"""Test-set scores and plot data shared by `evaluate` (per backbone) and `evaluate_model` (shipped model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from tlpipe.errors import PipelineError

# How far from 1 a row of class probabilities may sum and still be taken for float error. A float32 softmax
# is off by about 1e-7 per class, too much for scikit-learn's multiclass ROC AUC (1e-5) once there are
# thousands of classes; a row off by more than this is not a probability distribution at all.
ROW_SUM_TOLERANCE = 1e-3


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(n, n_classes) probabilities from a sigmoid head's (n, 1) or a softmax head's (n, C) output."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        positive = outputs.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return outputs


def normalised_rows(probabilities: np.ndarray) -> np.ndarray:
    """Each row divided by its sum, so it sums to 1 within float64 error.

    Refuses rows that are not probabilities: a negative or non-finite value, or a sum further than
    ROW_SUM_TOLERANCE from 1 (logits, a multi-label sigmoid head, a diverged model's NaN).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    sums = probabilities.sum(axis=1)
    bad = ~np.isfinite(sums) | (np.abs(sums - 1.0) > ROW_SUM_TOLERANCE) | (probabilities < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PipelineError(
            f"the model's outputs are not class probabilities: row {row} of {len(sums)} sums to {sums[row]:.6g} "
            f"({int(bad.sum())} such rows); scoring needs a softmax output (a sigmoid for two classes)"
        )
    return probabilities / sums[:, np.newaxis]


def classification_scores(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """accuracy, precision, recall, f1, roc_auc, loss and n_test, from unrounded probabilities.

    roc_auc is None when the test split holds one class: it is undefined there.

    Two classes: precision/recall/F1 of the second class (e.g. `dogs`) and the plain ROC AUC.
    More classes: macro averages and one-vs-rest ROC AUC, so every class counts equally.
    """
    probabilities = normalised_rows(probabilities)
    n_classes = probabilities.shape[1]
    labels = list(range(n_classes))
    y_pred = probabilities.argmax(axis=1)
    average = "binary" if n_classes == 2 else "macro"
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels if n_classes > 2 else None, average=average, zero_division=0
    )
    present = np.unique(y_true)
    if len(present) < 2:
        roc_auc = None
    elif n_classes == 2:
        roc_auc = skm.roc_auc_score(y_true, probabilities[:, 1])
    else:
        roc_auc = skm.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=labels)
    return {
        "accuracy": round(float(skm.accuracy_score(y_true, y_pred)), 6),
        "precision": round(float(precision), 6),
        "recall": round(float(recall), 6),
        "f1": round(float(f1), 6),
        "roc_auc": None if roc_auc is None else round(float(roc_auc), 6),
        "loss": round(float(skm.log_loss(y_true, clipped_rows(probabilities), labels=labels)), 6),
        "n_test": int(len(y_true)),
    }


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Each class's precision, recall, F1 and support (test images), in class order: how a result of many
    classes is read."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), average=None, zero_division=0
    )
    return pd.DataFrame(
        {
            "class": classes,
            "precision": precision.round(6),
            "recall": recall.round(6),
            "f1": f1.round(6),
            "support": support.astype(int),
        }
    )


def clipped_rows(probabilities: np.ndarray) -> np.ndarray:
    """Away from 0 (whose log loss is infinite), and summing to 1 again."""
    clipped = np.clip(probabilities, 1e-7, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def confusion_records(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict[str, str]]:
    """One {actual, predicted} record per image: the input DVC's `confusion` template counts."""
    return [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(y_true, y_pred)]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def roc_records(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """ROC points (fpr, tpr, threshold); one curve for two classes, one per class (one-vs-rest) otherwise."""
    curves = [1] if len(classes) == 2 else range(len(classes))
    records: list[dict[str, Any]] = []
    for index in curves:
        positives = (y_true == index).astype(int)
        if positives.min() == positives.max():
            continue
        fpr, tpr, thresholds = skm.roc_curve(positives, probabilities[:, index])
        for f, t, th in zip(fpr, tpr, thresholds):
            records.append(
                {
                    "class": classes[index],
                    "fpr": round(float(f), 6),
                    "tpr": round(float(t), 6),
                    "threshold": round(float(min(th, 1.0)), 6),
                }
            )
    return records
