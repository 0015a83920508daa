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


def test_identical_predictions_are_tied_with_p_1_and_an_interval_around_0() -> None:
    """No disagreement on 40 images does not make two models identical on all images: the interval is centred on
    0, and narrower than Wilson's bound on a disagreement never seen in 40 (0/40: up to 0.088)."""
    correct = np.array([True] * 30 + [False] * 10)
    paired = statistics.paired_comparison(correct, correct, 0.95)
    assert paired["p_value"] == 1.0 and paired["difference"] == 0.0
    assert paired["difference_ci_low"] == -paired["difference_ci_high"] < 0
    assert paired["difference_ci_high"] < wilson_by_hand(0, 40)[1]
    assert statistics.verdict(paired, 0.05) == "tied"


def test_a_real_difference_is_significant_and_its_interval_excludes_zero() -> None:
    reference, other = answers(960, 3, 17, 20)
    paired = statistics.paired_comparison(reference, other, 0.95)
    assert paired["difference"] == pytest.approx(0.014)
    assert 0 < paired["difference_ci_low"] < 0.014 < paired["difference_ci_high"]
    assert (paired["only_reference_right"], paired["only_other_right"]) == (3, 17)
    assert statistics.verdict(paired, 0.05) == "better"
    swapped = statistics.paired_comparison(other, reference, 0.95)
    assert statistics.verdict(swapped, 0.05) == "worse"
    assert (swapped["difference_ci_low"], swapped["difference_ci_high"]) == pytest.approx(
        (-paired["difference_ci_high"], -paired["difference_ci_low"]), abs=1e-6
    )


def wilson_by_hand(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson (1927): the proportions p0 with |p - p0| = z sqrt(p0 (1 - p0) / n), solved as a quadratic."""
    p = successes / n
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


@pytest.mark.parametrize(("successes", "n"), [(990, 1000), (170, 240), (0, 20), (20, 20)])
def test_the_accuracy_interval_is_wilsons_score_interval(successes: int, n: int) -> None:
    correct = np.array([True] * successes + [False] * (n - successes))
    assert statistics.accuracy_interval(correct, 0.95) == pytest.approx(wilson_by_hand(successes, n), abs=1e-6)


def tango_by_hand(both: int, only_reference: int, only_other: int, neither: int) -> tuple[float, float]:
    """Tango's (1998) score interval for paired proportions, by root finding: a different method, which on
    tables this size agrees with Newcombe's to about a point."""
    from scipy.optimize import brentq

    n, b, c, z = both + only_reference + only_other + neither, only_reference, only_other, 1.959964

    def score(delta: float) -> float:
        a, bb, cc = 2 * n, -b - c + (2 * n - c + b) * delta, -b * delta * (1 - delta)
        q = (math.sqrt(max(bb * bb - 4 * a * cc, 0.0)) - bb) / (2 * a)
        return (c - b - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))

    estimate = (c - b) / n
    return brentq(lambda d: score(d) - z, -0.999999, estimate), brentq(lambda d: score(d) + z, estimate, 0.999999)


@pytest.mark.parametrize("table", [(960, 3, 17, 20), (150, 12, 25, 53), (80, 9, 4, 7)])
def test_the_paired_interval_agrees_with_tangos_score_interval(table: tuple[int, int, int, int]) -> None:
    reference, other = answers(table[0], table[1], table[2], table[3])
    low, high = statistics.paired_difference_interval(reference, other, 0.95)
    tango = tango_by_hand(*table)
    assert low == pytest.approx(tango[0], abs=0.012) and high == pytest.approx(tango[1], abs=0.012)


@pytest.mark.parametrize("n_classes", [2, 4, 30])
def test_f1_of_every_resample_equals_scikit_learn(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 120)
    y_pred = np.where(rng.random(120) < 0.7, y, rng.integers(0, n_classes, 120))
    indices = rng.integers(0, 120, (25, 120))
    f1 = statistics.f1_samples(y, y_pred, indices, n_classes)
    for row, index in enumerate(indices):
        if n_classes == 2:
            assert f1[row] == pytest.approx(f1_score(y[index], y_pred[index], zero_division=0))
        else:
            macro = f1_score(y[index], y_pred[index], labels=range(n_classes), average="macro", zero_division=0)
            assert f1[row] == pytest.approx(macro)


def test_the_f1_interval_is_scipys_bca_bootstrap_and_seeded() -> None:
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.8, y, rng.integers(0, 3, 200))
    ours = statistics.f1_interval(y, y_pred, 3, 500, 0.95, seed=11)

    def macro_f1(index: np.ndarray) -> float:
        return f1_score(y[index], y_pred[index], labels=range(3), average="macro", zero_division=0)

    theirs = bootstrap(
        (np.arange(200),), macro_f1, n_resamples=500, method="BCa", vectorized=False, rng=np.random.default_rng(11)
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=1e-6)
    assert statistics.f1_interval(y, y_pred, 3, 500, 0.95, seed=11) == ours
    assert statistics.f1_interval(y, y, 3, 500, 0.95, seed=11) == (1.0, 1.0)  # no spread to correct


def hanley_mcneil_by_hand(auc: float, m: int, n: int) -> float:
    """Hanley and McNeil (1982), equation 2, with Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A) and Newcombe's N*
    = (m + n) / 2 - 1 for both group sizes."""
    q1, q2, n_star = auc / (2 - auc), 2 * auc * auc / (1 + auc), (m + n) / 2 - 1
    return (auc * (1 - auc) + (n_star - 1) * (q1 - auc * auc) + (n_star - 1) * (q2 - auc * auc)) / (m * n)


def test_the_roc_auc_interval_holds_every_value_within_z_standard_errors() -> None:
    """At each end, the observed AUC is exactly z Hanley-McNeil standard errors away, computed by hand."""
    rng = np.random.default_rng(8)
    y = np.array([0] * 60 + [1] * 40)
    scores = rng.normal(size=100) + 1.5 * y
    probabilities = np.stack([1 - 1 / (1 + np.exp(-scores)), 1 / (1 + np.exp(-scores))], axis=1)
    auc = roc_auc_score(y, probabilities[:, 1])
    low, high = statistics.roc_auc_interval(y, probabilities, 0.95)
    assert low < auc < high
    for end in (low, high):
        assert abs(auc - end) == pytest.approx(1.959964 * math.sqrt(hanley_mcneil_by_hand(end, 40, 60)), rel=1e-4)
    perfect = np.stack([1.0 - y, y.astype(float)], axis=1)
    low, high = statistics.roc_auc_interval(y, perfect, 0.95)
    assert high == 1.0 and 0.9 < low < 1.0  # a perfect ranking of 100 images is not certain to stay perfect


def test_f1_and_roc_auc_have_no_interval_where_a_class_has_too_few_test_images() -> None:
    minimum = statistics.MIN_CLASS_TEST_IMAGES
    y = np.array([0] * 20 + [1] * minimum + [2] * (minimum - 1))
    probabilities = np.eye(3)[y] * 0.7 + 0.1
    intervals = statistics.score_intervals(y, probabilities, 200, 0.95, 0)
    assert intervals["f1_ci_low"] is intervals["roc_auc_ci_high"] is None
    assert intervals["accuracy_ci_low"] is not None and "top5_accuracy" not in intervals
    note = statistics.undefined_intervals_note(y, ["a", "b", "c"])
    assert note == (
        f"F1 and ROC AUC have no interval: 1 of 3 classes have fewer than {minimum} test images (fewest: 'c', "
        f"{minimum - 1}); accuracy's interval holds"
    )
    y[-1] = 1  # c has one image fewer still; b one more
    y = np.concatenate([y, [2, 2]])
    probabilities = np.eye(3)[y] * 0.7 + 0.1
    defined = statistics.score_intervals(y, probabilities, 200, 0.95, 0)
    assert defined["f1_ci_low"] is not None and defined["roc_auc_ci_low"] is not None
    assert statistics.undefined_intervals_note(y, ["a", "b", "c"]) is None


def test_top5_accuracy_counts_the_true_class_among_the_five_most_probable_from_ten_classes_on() -> None:
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.ones(12), 300)
    y = rng.integers(0, 12, 300)
    ranks = (probabilities > probabilities[np.arange(300), y][:, None]).sum(axis=1)  # classes ranked above
    intervals = statistics.score_intervals(y, probabilities, 200, 0.95, 0)
    assert intervals["top5_accuracy"] == pytest.approx(np.mean(ranks < 5), abs=1e-6)
    low, high = intervals["top5_accuracy_ci_low"], intervals["top5_accuracy_ci_high"]
    assert (low, high) == pytest.approx(wilson_by_hand(int(np.sum(ranks < 5)), 300), abs=1e-6)
    nine = statistics.score_intervals(
        y % 9, probabilities[:, :9] / probabilities[:, :9].sum(1, keepdims=True), 200, 0.95, 0
    )
    assert "top5_accuracy" not in nine


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
