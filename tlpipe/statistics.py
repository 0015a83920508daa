"""How sure a score is: bootstrap intervals, paired comparisons, calibration and temperature scaling.

Every resample is drawn from a seeded generator and stratified by class (each resample keeps the test
split's class counts), so the same predictions always give the same intervals. Library code does the
statistics that have a well-kept implementation: McNemar's exact test (statsmodels), the Brier score
(scikit-learn), ranks and the temperature's one-dimensional fit (scipy). F1 and ROC AUC are computed for
all resamples at once (tests/test_statistics.py checks them against scikit-learn, resample by resample).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata
from sklearn import metrics as skm

ECE_BINS = 15
# Below this many test images, intervals are wide enough to mislead at a glance: say so.
FEW_TEST_IMAGES = 30
TEMPERATURE_RANGE = (0.05, 20.0)


def resample_indices(y_true: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) indices into the test split, each row drawn with replacement within every class."""
    rng = np.random.default_rng(seed)
    columns = []
    for label in np.unique(y_true):
        members = np.flatnonzero(y_true == label)
        columns.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return round(float(low), 6), round(float(high), 6)


def f1_samples(y_true: np.ndarray, y_pred: np.ndarray, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """scoring.classification_scores' F1 on every resample (rows of `indices`): the second class's F1 for two
    classes, the macro F1 otherwise; 0 for a class that is neither present nor predicted (zero_division=0)."""
    truth, predicted = y_true[indices], y_pred[indices]
    per_class = []
    for label in [1] if n_classes == 2 else range(n_classes):
        tp = np.sum((predicted == label) & (truth == label), axis=1)
        wrong = np.sum((predicted == label) != (truth == label), axis=1)  # false positives + false negatives
        per_class.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
    return np.mean(per_class, axis=0)


def roc_auc_samples(y_true: np.ndarray, probabilities: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """scoring.classification_scores' ROC AUC on every resample: the Mann-Whitney U of each one-vs-rest
    curve (average ranks for ties, as scikit-learn's roc_auc_score), macro-averaged over classes."""
    truth = y_true[indices]
    n_classes = probabilities.shape[1]
    per_class = []
    for label in [1] if n_classes == 2 else range(n_classes):
        positive = truth == label
        ranks = rankdata(probabilities[:, label][indices], axis=1)
        n_positive = positive.sum(axis=1)
        n_negative = positive.shape[1] - n_positive
        u = (ranks * positive).sum(axis=1) - n_positive * (n_positive + 1) / 2
        per_class.append(u / (n_positive * n_negative))
    return np.mean(per_class, axis=0)


def bootstrap_intervals(
    y_true: np.ndarray, probabilities: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> dict[str, float | None]:
    """`<metric>_ci_low`/`_ci_high` for accuracy, F1 and ROC AUC (None where the metric is undefined)."""
    indices = resample_indices(y_true, n_resamples, seed)
    y_pred = probabilities.argmax(axis=1)
    samples = {
        "accuracy": (y_pred[indices] == y_true[indices]).mean(axis=1),
        "f1": f1_samples(y_true, y_pred, indices, probabilities.shape[1]),
    }
    # Stratified resamples keep every class, so ROC AUC is defined in each one exactly when it is on the split;
    # with more than two classes, every class must be on it (as for scikit-learn's one-vs-rest).
    present = len(np.unique(y_true))
    if present == probabilities.shape[1] or (present == 2 and probabilities.shape[1] == 2):
        samples["roc_auc"] = roc_auc_samples(y_true, probabilities, indices)
    intervals: dict[str, float | None] = {}
    for metric in ("accuracy", "f1", "roc_auc"):
        low, high = percentile_interval(samples[metric], confidence) if metric in samples else (None, None)
        intervals[f"{metric}_ci_low"], intervals[f"{metric}_ci_high"] = low, high
    return intervals


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """McNemar's exact test (statsmodels) on two models' right/wrong answers for the same images."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = correct_a.astype(bool), correct_b.astype(bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    return float(mcnemar(table, exact=True).pvalue)


def paired_comparison(
    y_true: np.ndarray,
    correct_reference: np.ndarray,
    correct_other: np.ndarray,
    n_resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """`other` against `reference` on the same images: accuracy difference (other - reference) with a paired
    bootstrap interval (the same resampled images for both), McNemar's p and the two discordant counts."""
    indices = resample_indices(y_true, n_resamples, seed)
    differences = correct_other[indices].mean(axis=1) - correct_reference[indices].mean(axis=1)
    low, high = percentile_interval(differences, confidence)
    reference, other = correct_reference.astype(bool), correct_other.astype(bool)
    return {
        "difference": round(float(other.mean() - reference.mean()), 6),
        "difference_ci_low": low,
        "difference_ci_high": high,
        "p_value": round(mcnemar_p(reference, other), 6),
        "only_reference_right": int(np.sum(reference & ~other)),
        "only_other_right": int(np.sum(~reference & other)),
    }


def verdict(comparison: dict[str, Any], alpha: float) -> str:
    """`better`, `worse`, or `tied` (not significantly different at level alpha)."""
    if comparison["p_value"] >= alpha:
        return "tied"
    return "better" if comparison["difference"] > 0 else "worse"


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: over `bins` equal-width confidence bins, the image-weighted |accuracy - confidence|."""
    total = sum(
        b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(y_true, probabilities, bins)
    )
    return round(float(total / len(y_true)), 6)


def reliability_bins(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its mean confidence, accuracy and image count (the reliability diagram's points)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return [
        {
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """scikit-learn's Brier score: mean squared error of the probabilities (of the positive class for two)."""
    labels = list(range(probabilities.shape[1]))
    if probabilities.shape[1] == 2:
        return round(float(skm.brier_score_loss(y_true, probabilities[:, 1], labels=labels)), 6)
    return round(float(skm.brier_score_loss(y_true, probabilities, labels=labels)), 6)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (which softmax ignores), finite even for probabilities of 0."""
    return np.log(np.clip(probabilities, 1e-12, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T): T > 1 softens over-confident probabilities; the ranking (and accuracy) is unchanged."""
    scaled = log_probabilities(np.asarray(probabilities, dtype=np.float64)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    return float(-np.mean(log_probabilities(probabilities)[np.arange(len(y_true)), y_true]))


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `y_true` (Guo et al., 2017).

    Searched over log T, so that halving and doubling are the same step; T = 1 (no change) is inside the
    range, so on the data it is fitted on the scaled likelihood is never worse than the raw one.
    """
    logits = log_probabilities(np.asarray(probabilities, dtype=np.float64))

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(axis=1))
        return float(np.mean(log_norm - scaled[np.arange(len(y_true)), y_true]))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    best = float(result.x) if nll(float(result.x)) <= nll(0.0) else 0.0
    return round(math.exp(best), 6)


def calibration(y_true: np.ndarray, probabilities: np.ndarray, alpha: float) -> dict[str, float]:
    """The temperature to apply, fitted on `y_true`/`probabilities` (the validation split), and whether the
    data support it: a likelihood-ratio test of the fitted temperature against T = 1 (chi-squared, one degree
    of freedom). Below `alpha` the fitted temperature is applied; otherwise the model's probabilities are
    left as they are (`temperature` 1), because a temperature fitted to noise makes unseen data worse."""
    from scipy.stats import chi2

    fitted = fit_temperature(y_true, probabilities)
    gain = negative_log_likelihood(y_true, probabilities) - negative_log_likelihood(
        y_true, apply_temperature(probabilities, fitted)
    )
    p_value = float(chi2.sf(max(0.0, 2.0 * len(y_true) * gain), df=1))
    return {
        "temperature": fitted if p_value < alpha else 1.0,
        "temperature_fitted": fitted,
        "temperature_p_value": round(p_value, 6),
    }
