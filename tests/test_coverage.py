"""Every nominal 95% interval the pipeline reports holds the true value in 93-97% of 1,000 simulated test sets
(benchmarks/coverage.py draws them; `python -m benchmarks.coverage` prints the whole table).

- accuracy and the paired difference against the best, in every setting;
- F1 where it has an interval: not in setting b, whose classes have 1-3 test images (the pipeline gives
  none there, and says so);
- ROC AUC where it has one: at least 93%. Newcombe's score interval is conservative where the AUC is near 1
  (settings a and c): a wider interval, never a narrower one (docs/statistics.md).
"""

from __future__ import annotations

import pytest

from benchmarks import coverage

SETS = 1000
BAND = (0.93, 0.97)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_every_interval_holds_the_true_value_95_percent_of_the_time(name: str) -> None:
    setting = coverage.settings()[name]
    result = coverage.measure(setting, "pipeline", SETS, seed=0)
    print(f"\n{setting.description}: {result}")
    for metric in ("accuracy", "difference"):
        assert result[metric]["undefined"] == 0
        assert BAND[0] <= result[metric]["coverage"] <= BAND[1], (metric, result[metric])
    if name == "b":
        assert result["f1"]["undefined"] == result["roc_auc"]["undefined"] == SETS
        return
    assert result["f1"]["undefined"] < SETS / 2 and BAND[0] <= result["f1"]["coverage"] <= BAND[1], result["f1"]
    assert result["roc_auc"]["coverage"] >= BAND[0], result["roc_auc"]


@pytest.mark.slow
def test_the_stratified_bootstrap_of_before_was_too_narrow_where_classes_are_tiny() -> None:
    """The same measurement fails the intervals the pipeline gave before: resampling within classes of one
    test image holds them fixed, and covers far less often than it claims."""
    result = coverage.measure(coverage.settings()["b"], "before", 200, seed=0, metrics=("accuracy", "difference"))
    assert result["accuracy"]["coverage"] < BAND[0] and result["difference"]["coverage"] < BAND[0], result
