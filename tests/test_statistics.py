"""Each statistic against an independent computation on data built for the test: McNemar on hand-made
tables, interval coverage on predictions of known accuracy, ECE on a case worked by hand, the temperature
recovered from probabilities made over-confident by a known factor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from tlpipe import statistics


def exact_mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial test of the discordant pairs, summed by hand."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def answers(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    return a, b


@pytest.mark.parametrize("table", [(960, 17, 3, 20), (990, 2, 1, 7), (50, 9, 1, 0), (10, 0, 0, 5)])
def test_mcnemar_equals_the_exact_binomial_test_by_hand(table: tuple[int, int, int, int]) -> None:
    a, b = answers(*table)
    assert statistics.mcnemar_p(a, b) == pytest.approx(exact_mcnemar(table[1], table[2]), rel=1e-9)


def test_the_issues_examples() -> None:
    """VGG16 against MobileNetV2 (17 against 3 discordant images) differ; frozen against fine-tuned
    MobileNetV2 (2 against 1) cannot be told apart."""
    assert statistics.mcnemar_p(*answers(960, 17, 3, 20)) == pytest.approx(0.0026, abs=1e-4)
    assert statistics.mcnemar_p(*answers(990, 2, 1, 7)) == 1.0


def test_identical_predictions_are_tied_with_p_1() -> None:
    y = np.array([0, 1] * 20)
    correct = np.array([True] * 30 + [False] * 10)
    paired = statistics.paired_comparison(y, correct, correct, 500, 0.95, 0)
    assert paired["p_value"] == 1.0 and paired["difference"] == 0.0
    assert paired["difference_ci_low"] == paired["difference_ci_high"] == 0.0
    assert statistics.verdict(paired, 0.05) == "tied"


def test_a_real_difference_is_significant_and_its_interval_excludes_zero() -> None:
    y = np.array([0, 1] * 500)
    reference, other = answers(960, 3, 17, 20)
    paired = statistics.paired_comparison(y, reference, other, 2000, 0.95, 0)
    assert paired["difference"] == pytest.approx(0.014)
    assert 0 < paired["difference_ci_low"] < 0.014 < paired["difference_ci_high"]
    assert (paired["only_reference_right"], paired["only_other_right"]) == (3, 17)
    assert statistics.verdict(paired, 0.05) == "better"
    assert statistics.verdict(statistics.paired_comparison(y, other, reference, 2000, 0.95, 0), 0.05) == "worse"


def test_resamples_are_stratified_and_seeded() -> None:
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    indices = statistics.resample_indices(y, 200, seed=7)
    assert indices.shape == (200, 45)
    assert all(np.bincount(y[row], minlength=3).tolist() == [30, 10, 5] for row in indices)
    assert np.array_equal(indices, statistics.resample_indices(y, 200, seed=7))
    assert not np.array_equal(indices, statistics.resample_indices(y, 200, seed=8))


@pytest.mark.parametrize("n_classes", [2, 4])
def test_f1_and_roc_auc_of_every_resample_equal_scikit_learn(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 120)
    logits = rng.normal(size=(120, n_classes)) + 1.5 * np.eye(n_classes)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities[:10] = probabilities[0]  # ties between scores, ranked as scikit-learn ranks them
    y_pred = probabilities.argmax(axis=1)
    indices = statistics.resample_indices(y, 25, seed=1)
    f1 = statistics.f1_samples(y, y_pred, indices, n_classes)
    auc = statistics.roc_auc_samples(y, probabilities, indices)
    for row, index in enumerate(indices):
        if n_classes == 2:
            assert f1[row] == pytest.approx(f1_score(y[index], y_pred[index]))
            assert auc[row] == pytest.approx(roc_auc_score(y[index], probabilities[index, 1]))
        else:
            macro = f1_score(y[index], y_pred[index], labels=range(n_classes), average="macro", zero_division=0)
            assert f1[row] == pytest.approx(macro)
            assert auc[row] == pytest.approx(roc_auc_score(y[index], probabilities[index], multi_class="ovr"))


def test_accuracy_intervals_cover_the_true_accuracy_about_95_percent_of_the_time() -> None:
    """Test splits of 200 images drawn from a model whose true accuracy is 0.9: the 95% interval of each
    must hold 0.9 in about 95% of 300 splits (a binomial band of ±3.8 points around 95% at 3 sigma)."""
    rng = np.random.default_rng(2026)
    y = np.array([0, 1] * 100)
    covered = 0
    for trial in range(300):
        correct = rng.random(200) < 0.9
        y_pred = np.where(correct, y, 1 - y)
        probabilities = np.stack([1.0 - y_pred, y_pred], axis=1) * 0.8 + 0.1
        intervals = statistics.bootstrap_intervals(y, probabilities, 500, 0.95, seed=trial)
        covered += intervals["accuracy_ci_low"] <= 0.9 <= intervals["accuracy_ci_high"]
    assert 0.9 <= covered / 300 <= 0.99, covered


def test_roc_auc_interval_is_none_where_the_split_has_one_class() -> None:
    probabilities = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    intervals = statistics.bootstrap_intervals(np.zeros(3, int), probabilities, 200, 0.95, 0)
    assert intervals["roc_auc_ci_low"] is None and intervals["roc_auc_ci_high"] is None
    assert intervals["accuracy_ci_low"] is not None


def test_ece_of_a_case_worked_by_hand() -> None:
    """Two images at confidence 0.9 (one right: accuracy 0.5, gap 0.4) and two at 0.6 (both right: gap
    0.4), in different bins of 15: ECE = 2/4 * 0.4 + 2/4 * 0.4 = 0.4."""
    probabilities = np.array([[0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([1, 0, 0, 1])
    assert statistics.expected_calibration_error(y, probabilities) == pytest.approx(0.4)
    bins = statistics.reliability_bins(y, probabilities)
    assert [(round(b["confidence"], 6), b["accuracy"], b["count"]) for b in bins] == [(0.6, 1.0, 2), (0.9, 0.5, 2)]


def test_a_perfectly_calibrated_case_has_ece_0_and_the_brier_score_is_scikit_learns() -> None:
    probabilities = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    y = np.array([0, 1, 1, 0])
    assert statistics.expected_calibration_error(y, probabilities) == 0.0
    assert statistics.brier_score(y, probabilities) == pytest.approx((0.25 + 0.25 + 0 + 0) / 4)
    three = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    assert statistics.brier_score(np.array([1, 2]), three) == pytest.approx(
        ((0.04 + 0.25 + 0.09) + (0.01 + 0.01 + 0.04)) / 2
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_a_known_overconfidence() -> None:
    """Labels drawn from softmax(z); the model reports softmax(2 z): the fitted temperature is near 2."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(logits)])
    overconfident = softmax(2 * logits)
    temperature = statistics.fit_temperature(y, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.1)
    calibrated = statistics.apply_temperature(overconfident, temperature)
    assert np.allclose(calibrated, softmax(logits), atol=0.03)
    assert statistics.expected_calibration_error(y, calibrated) < statistics.expected_calibration_error(
        y, overconfident
    )
    nll = statistics.negative_log_likelihood
    for other in (1.0, temperature * 0.95, temperature * 1.05):
        assert nll(y, calibrated) <= nll(y, statistics.apply_temperature(overconfident, other)) + 1e-12


def test_temperature_keeps_every_ranking_and_1_changes_nothing() -> None:
    probabilities = softmax(np.random.default_rng(1).normal(size=(50, 4)))
    assert np.allclose(statistics.apply_temperature(probabilities, 1.0), probabilities)
    scaled = statistics.apply_temperature(probabilities, 3.0)
    assert np.array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
    assert np.allclose(scaled.sum(axis=1), 1.0)
    assert scaled.max() < probabilities.max()


def test_the_temperature_is_applied_only_where_the_validation_data_support_it() -> None:
    """A likelihood-ratio test of the fitted temperature against none: an over-confidence by a factor of 2
    on 2,000 images is applied; a calibrated model's fitted temperature (noise) is not."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (2000, 2))
    y = np.array([rng.choice(2, p=p) for p in softmax(logits)])
    skewed = statistics.calibration(y, softmax(2 * logits), alpha=0.05)
    assert skewed["temperature"] == skewed["temperature_fitted"] == pytest.approx(2.0, rel=0.15)
    assert skewed["temperature_p_value"] < 1e-6
    honest = statistics.calibration(y, softmax(logits), alpha=0.05)
    assert honest["temperature"] == 1.0 and honest["temperature_p_value"] >= 0.05
    assert honest["temperature_fitted"] == pytest.approx(1.0, abs=0.1)
    # The p-value is the chi-squared tail of twice the log-likelihood gain, computed here by hand.
    gain = statistics.negative_log_likelihood(y, softmax(logits)) - statistics.negative_log_likelihood(
        y, statistics.apply_temperature(softmax(logits), honest["temperature_fitted"])
    )
    assert honest["temperature_p_value"] == pytest.approx(math.erfc(math.sqrt(2 * 2000 * gain / 2)), abs=1e-6)
    assert statistics.calibration(y, softmax(logits), alpha=1.0)["temperature"] == honest["temperature_fitted"]
