"""How sure a score is: confidence intervals, paired comparisons, calibration and temperature scaling.

Every interval treats the test images as a random sample of the images the model will meet, class mix
included, so a class with one test image adds the variance it really adds (resampling within each class
would hold it fixed). Each interval is the method that measured closest to its nominal coverage in
`benchmarks/coverage.py`, which simulates test sets from 2 classes of 500 images to 120 classes of 1-3:

- accuracy (and top-5 accuracy): Wilson's score interval (statsmodels `proportion_confint`);
- the paired difference of two models' accuracy on the same images: Newcombe's method 10 (1998), built on
  the Wilson intervals of the two accuracies and their correlation; McNemar's exact test (statsmodels)
  gives the p-value;
- F1: a BCa bootstrap of the test images (`scipy.stats.bootstrap`), seeded;
- ROC AUC: Newcombe's score interval (2006, method 5), with Hanley and McNeil's variance of the
  Mann-Whitney statistic (one-vs-rest and averaged over classes for more than two).

F1 and ROC AUC have no interval (None) where a class has fewer than MIN_CLASS_TEST_IMAGES test images:
their per-class terms cannot be estimated from so few, and no method covers there.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import bootstrap, norm
from sklearn import metrics as skm

ECE_BINS = 15
# Below this many test images, intervals are wide enough to mislead at a glance: say so.
FEW_TEST_IMAGES = 30
# F1 and ROC AUC intervals need this many test images of every class (see the module docstring).
MIN_CLASS_TEST_IMAGES = 5
# Top-5 accuracy is reported from this many classes on (with fewer, nearly every image is in its top 5).
TOP_K, TOP_K_FROM_CLASSES = 5, 10
TEMPERATURE_RANGE = (0.05, 20.0)
# Resamples (and jackknife samples) per batch of the F1 bootstrap: bounds its memory at any test size.
BOOTSTRAP_BATCH = 100


def rounded(interval: tuple[float, float]) -> tuple[float, float]:
    return round(float(interval[0]), 6), round(float(interval[1]), 6)


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion (statsmodels)."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=1.0 - confidence, method="wilson")
    return rounded((max(0.0, low), min(1.0, high)))


def accuracy_interval(correct: np.ndarray, confidence: float) -> tuple[float, float]:
    correct = np.asarray(correct, dtype=bool)
    return wilson_interval(int(correct.sum()), len(correct), confidence)


def paired_difference_interval(
    correct_reference: np.ndarray, correct_other: np.ndarray, confidence: float
) -> tuple[float, float]:
    """Newcombe's (1998) method 10 for the difference of two paired proportions, other - reference.

    Each accuracy's Wilson interval gives its distance to the bounds; the two are combined with phi, the
    correlation of the two models' right answers (0 where a margin of the 2 x 2 table is empty). It stays
    inside [-1, 1], and, unlike a bootstrap, does not collapse to a point when the two models disagree on
    few images. statsmodels has it only after its 0.15 release (`confint_proportions_paired`).
    """
    reference, other = np.asarray(correct_reference, bool), np.asarray(correct_other, bool)
    n = len(reference)
    both, only_other = int(np.sum(reference & other)), int(np.sum(~reference & other))
    only_reference, neither = int(np.sum(reference & ~other)), int(np.sum(~reference & ~other))
    p_other, p_reference = (both + only_other) / n, (both + only_reference) / n
    low_other, high_other = wilson_interval(both + only_other, n, confidence)
    low_reference, high_reference = wilson_interval(both + only_reference, n, confidence)
    margins = (both + only_other) * (only_reference + neither) * (both + only_reference) * (only_other + neither)
    phi = (both * neither - only_other * only_reference) / math.sqrt(margins) if margins else 0.0
    below_other, above_other = p_other - low_other, high_other - p_other
    below_reference, above_reference = p_reference - low_reference, high_reference - p_reference
    difference = p_other - p_reference
    low = difference - math.sqrt(
        max(0.0, below_other**2 - 2 * phi * below_other * above_reference + above_reference**2)
    )
    high = difference + math.sqrt(
        max(0.0, above_other**2 - 2 * phi * above_other * below_reference + below_reference**2)
    )
    return rounded((max(-1.0, low), min(1.0, high)))


def f1_samples(y_true: np.ndarray, y_pred: np.ndarray, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """scoring.classification_scores' F1 on every row of `indices` (images drawn from the test split): the
    second class's F1 for two classes, the macro F1 otherwise; 0 for a class neither present nor predicted
    (zero_division=0). Counted with one bincount per row block, so its cost does not grow with the classes."""
    indices = np.atleast_2d(indices)
    truth, predicted = y_true[indices], y_pred[indices]
    offsets = (np.arange(len(indices)) * n_classes)[:, np.newaxis]
    size = len(indices) * n_classes

    def counts(labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels.ravel(), minlength=size).reshape(len(indices), n_classes)

    support, predicted_count = counts(truth + offsets), counts(predicted + offsets)
    hits = truth == predicted
    true_positives = np.bincount((truth + offsets)[hits], minlength=size).reshape(len(indices), n_classes)
    denominator = support + predicted_count  # 2 TP + FP + FN
    per_class = np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0)
    return per_class[:, 1] if n_classes == 2 else per_class.mean(axis=1)


def f1_interval(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """BCa bootstrap interval of F1 over the test images (scipy.stats.bootstrap, seeded by `seed`).

    An F1 that no resample changes (every image right, say) has no spread to correct: the interval is
    that F1 alone, which scipy would report as NaN.
    """

    def statistic(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        values = f1_samples(y_true, y_pred, indices, n_classes)
        return values if np.ndim(indices) > 1 else values[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns of the degenerate case handled below
        result = bootstrap(
            (np.arange(len(y_true)),),
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="BCa",
            vectorized=True,
            batch=BOOTSTRAP_BATCH,
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        value = float(statistic(np.arange(len(y_true))))
        return rounded((value, value))
    return rounded((low, high))


def hanley_mcneil_variance(auc: float, positives: np.ndarray, negatives: np.ndarray) -> float:
    """Hanley and McNeil's (1982) variance of the Mann-Whitney AUC with `positives` and `negatives` images,
    with Newcombe's (2006) N* = (m + n) / 2 - 1 in place of both group sizes; summed over classes."""
    n_star = (positives + negatives) / 2.0 - 1.0
    spread = (1.0 - auc) / (2.0 - auc) + auc / (1.0 + auc)
    return float(np.sum(auc * (1.0 - auc) / (positives * negatives) * (1.0 + (n_star - 1.0) * spread)))


def roc_auc_interval(y_true: np.ndarray, probabilities: np.ndarray, confidence: float) -> tuple[float, float]:
    """Newcombe's (2006) score interval of the ROC AUC (method 5): every value whose Hanley-McNeil variance
    puts the observed AUC within z standard errors. The variance is a function of the candidate value, not
    of the observed one, so an AUC near 1 on few images does not shrink its own interval, as DeLong's
    variance and the bootstrap do. For more than two classes: the one-vs-rest macro average, its variance
    the per-class variances summed over K^2 (the classes taken as independent)."""
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        observed = skm.roc_auc_score(y_true, probabilities[:, 1])
        positives = np.array([np.sum(y_true == 1)])
    else:
        observed = skm.roc_auc_score(
            y_true, probabilities, multi_class="ovr", average="macro", labels=list(range(n_classes))
        )
        positives = np.bincount(y_true, minlength=n_classes)
    negatives = len(y_true) - positives
    classes = len(positives)
    z = float(norm.ppf(0.5 + confidence / 2.0))

    def outside(value: float) -> float:  # > 0 where `value` is outside the interval
        variance = hanley_mcneil_variance(value, positives, negatives) / classes**2
        return (observed - value) ** 2 - z * z * variance

    edge = 1e-12
    low = brentq(outside, 0.0, observed - edge) if observed > edge and outside(observed - edge) < 0 else observed
    high = brentq(outside, observed + edge, 1.0) if observed < 1 - edge and outside(observed + edge) < 0 else 1.0
    return rounded((low, high))


def top_k_correct(y_true: np.ndarray, probabilities: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Whether each image's class is among its k most probable (ties broken as argsort breaks them)."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return (top == y_true[:, np.newaxis]).any(axis=1)


def score_intervals(
    y_true: np.ndarray, probabilities: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> dict[str, float | None]:
    """`<metric>_ci_low`/`_ci_high` for accuracy, F1 and ROC AUC (None where undefined: see the module
    docstring), and `top5_accuracy` with its interval from TOP_K_FROM_CLASSES classes on."""
    n_classes = probabilities.shape[1]
    y_pred = probabilities.argmax(axis=1)
    intervals: dict[str, Any] = {}
    intervals["accuracy_ci_low"], intervals["accuracy_ci_high"] = accuracy_interval(y_pred == y_true, confidence)
    f1 = auc = (None, None)
    if np.bincount(y_true, minlength=n_classes).min() >= MIN_CLASS_TEST_IMAGES:
        f1 = f1_interval(y_true, y_pred, n_classes, n_resamples, confidence, seed)
        auc = roc_auc_interval(y_true, probabilities, confidence)
    intervals["f1_ci_low"], intervals["f1_ci_high"] = f1
    intervals["roc_auc_ci_low"], intervals["roc_auc_ci_high"] = auc
    if n_classes >= TOP_K_FROM_CLASSES:
        top = top_k_correct(y_true, probabilities)
        intervals["top5_accuracy"] = round(float(top.mean()), 6)
        intervals["top5_accuracy_ci_low"], intervals["top5_accuracy_ci_high"] = accuracy_interval(top, confidence)
    return intervals


def undefined_intervals_note(y_true: np.ndarray, classes: list[str]) -> str | None:
    """Why F1 and ROC AUC have no interval, or None when they have one."""
    counts = np.bincount(y_true, minlength=len(classes))
    small = np.flatnonzero(counts < MIN_CLASS_TEST_IMAGES)
    if not len(small):
        return None
    fewest = int(np.argmin(counts))
    return (
        f"F1 and ROC AUC have no interval: {len(small)} of {len(classes)} classes have fewer than "
        f"{MIN_CLASS_TEST_IMAGES} test images (fewest: {classes[fewest]!r}, {counts[fewest]}); accuracy's "
        "interval holds"
    )


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """McNemar's exact test (statsmodels) on two models' right/wrong answers for the same images."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = correct_a.astype(bool), correct_b.astype(bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    return float(mcnemar(table, exact=True).pvalue)


def paired_comparison(correct_reference: np.ndarray, correct_other: np.ndarray, confidence: float) -> dict[str, Any]:
    """`other` against `reference` on the same images: the accuracy difference (other - reference) with
    its paired interval (paired_difference_interval), McNemar's p and the two discordant counts."""
    reference, other = correct_reference.astype(bool), correct_other.astype(bool)
    low, high = paired_difference_interval(reference, other, confidence)
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
