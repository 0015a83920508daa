"""How often each 95% interval holds the true value: `python -m benchmarks.coverage`.

Simulates test sets whose true scores are known and counts how often each interval of `tlpipe.statistics`
covers them. The settings span what users bring:

- `a`: 2 classes of 500 images, accuracy 0.99 (the tutorial's data);
- `b`: 120 classes of 1-3 images each, accuracy about 0.7 (a fine-grained set of few photos per class);
- `c`: 1,000 images split 95/5 between two classes;
- `d`: 10 classes of 10 images: the smallest test split on which F1 and ROC AUC get an interval.

Each test set is drawn as the pipeline's intervals assume: images drawn at random from the population, class
mix included (`--design fixed` holds every class's count fixed instead, as a folder-based split does). Two
models score each image: `best`, and a weaker `other` whose errors are correlated with best's; the paired
interval is that of other - best. Each model's logits are the true class's mean plus Gaussian noise, and its
probabilities their softmax. True values come from 400,000 images of the same population.

`alternative` is what the pipeline's intervals were chosen over (alternative_intervals). `before` is the
intervals the pipeline used before this benchmark: a percentile bootstrap that resamples within each class,
which holds a class of one test image fixed. It runs on fewer sets (`--before-sets`): resampling 120 classes
1,000 times per set is slow.

Writes benchmarks/coverage.json and its table into docs/statistics.md (between the `coverage` markers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, softmax
from scipy.stats import bootstrap, norm, rankdata
from sklearn import metrics as skm

from benchmarks import Block, benchmark_parser, load_results, measured, publish, save_results, stamp
from tlpipe import statistics

NAME = "coverage"
PAGE = "docs/statistics.md"
CONFIDENCE = 0.95
RESAMPLES = 1000  # the default stats.bootstrap
TRUTH_IMAGES = 400_000
SHARPNESS = 1.5  # probabilities are softmax(SHARPNESS * logits)
CORRELATION = 0.5  # between the two models' logit noise
METRICS = ("accuracy", "difference", "f1", "roc_auc")


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    counts: tuple[int, ...]  # test images per class (expected under the random design)
    means: tuple[tuple[float, ...], tuple[float, ...]]  # per class: the true class's logit mean, best and other

    @property
    def n_classes(self) -> int:
        return len(self.counts)


def settings() -> dict[str, Setting]:
    """The four settings, each drawn from its own seed so that they do not change when one is added."""
    rng = np.random.default_rng(29)
    counts_b = tuple(int(c) for c in rng.integers(1, 4, 120))
    spread_b, spread_d = rng.normal(0, 0.4, 120), rng.normal(0, 0.4, 10)
    return {
        "a": Setting("a", "2 classes x 500, accuracy 0.99", (500, 500), ((3.29, 3.29), (3.05, 3.05))),
        "b": Setting(
            "b",
            "120 classes x 1-3, accuracy 0.7",
            counts_b,
            (tuple(3.15 + spread_b), tuple(2.95 + spread_b)),
        ),
        "c": Setting("c", "2 classes, 950/50", (950, 50), ((3.0, 1.6), (2.9, 1.4))),
        "d": Setting("d", "10 classes x 10", (10,) * 10, (tuple(2.5 + spread_d), tuple(2.3 + spread_d))),
    }


def draw(setting: Setting, rng: np.random.Generator, n: int | None = None, fixed: bool = False) -> tuple[Any, ...]:
    """(y_true, best's probabilities, other's probabilities) of one simulated test set."""
    counts = np.array(setting.counts)
    if fixed:
        y = np.repeat(np.arange(setting.n_classes), counts)
    else:
        y = rng.choice(setting.n_classes, size=n or int(counts.sum()), p=counts / counts.sum())
    noise = rng.standard_normal((2, len(y), setting.n_classes))
    noise[1] = CORRELATION * noise[0] + np.sqrt(1 - CORRELATION**2) * noise[1]
    probabilities = []
    for model, means in enumerate(setting.means):
        logits = noise[model]
        logits[np.arange(len(y)), y] += np.array(means)[y]
        probabilities.append(softmax(SHARPNESS * logits, axis=1))
    return y, probabilities[0], probabilities[1]


def f1_score(y: np.ndarray, probabilities: np.ndarray, n_classes: int) -> float:
    average = "binary" if n_classes == 2 else "macro"
    labels = None if n_classes == 2 else list(range(n_classes))
    return float(skm.f1_score(y, probabilities.argmax(axis=1), labels=labels, average=average, zero_division=0))


def roc_auc(y: np.ndarray, probabilities: np.ndarray, n_classes: int) -> float:
    if n_classes == 2:
        return float(skm.roc_auc_score(y, probabilities[:, 1]))
    return float(skm.roc_auc_score(y, probabilities, multi_class="ovr", labels=list(range(n_classes))))


def true_values(setting: Setting, seed: int = 4242, chunk: int = 50_000) -> dict[str, float]:
    """The scores on TRUTH_IMAGES images of the population, drawn in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    parts = [draw(setting, rng, chunk) for _ in range(TRUTH_IMAGES // chunk)]
    y = np.concatenate([part[0] for part in parts])
    best = np.concatenate([part[1].astype(np.float32) for part in parts])
    right_other = np.concatenate([part[2].argmax(axis=1) == part[0] for part in parts])
    accuracy = float(np.mean(best.argmax(axis=1) == y))
    return {
        "accuracy": accuracy,
        "difference": float(np.mean(right_other)) - accuracy,
        "f1": f1_score(y, best, setting.n_classes),
        "roc_auc": roc_auc(y, best, setting.n_classes),
    }


Intervals = dict[str, tuple[float | None, float | None]]


def pipeline_intervals(
    y: np.ndarray, best: np.ndarray, other: np.ndarray, seed: int, metrics: tuple[str, ...]
) -> Intervals:
    """The intervals `evaluate` and `aggregate` write, from tlpipe.statistics."""
    scores = statistics.score_intervals(y, best, RESAMPLES, CONFIDENCE, seed)
    right_best, right_other = best.argmax(axis=1) == y, other.argmax(axis=1) == y
    paired = statistics.paired_comparison(right_best, right_other, CONFIDENCE)
    return {
        metric: (scores[f"{metric}_ci_low"], scores[f"{metric}_ci_high"]) for metric in ("accuracy", "f1", "roc_auc")
    } | {"difference": (paired["difference_ci_low"], paired["difference_ci_high"])}


def stratified_indices(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    columns = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        columns.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def stratified_roc_auc(y: np.ndarray, probabilities: np.ndarray, indices: np.ndarray) -> np.ndarray:
    truth, per_class = y[indices], []
    for label in [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1]):
        positive = truth == label
        ranks = rankdata(probabilities[:, label][indices], axis=1)
        n_positive = positive.sum(axis=1)
        u = (ranks * positive).sum(axis=1) - n_positive * (n_positive + 1) / 2
        per_class.append(u / (n_positive * (positive.shape[1] - n_positive)))
    return np.mean(per_class, axis=0)


def before_intervals(
    y: np.ndarray, best: np.ndarray, other: np.ndarray, seed: int, metrics: tuple[str, ...]
) -> Intervals:
    """The intervals before: percentile intervals of a bootstrap resampling within each class."""
    rng = np.random.default_rng(seed)
    indices = stratified_indices(y, RESAMPLES, rng)
    right_best, right_other = best.argmax(axis=1) == y, other.argmax(axis=1) == y
    samples = {
        "accuracy": right_best[indices].mean(axis=1),
        "difference": right_other[indices].mean(axis=1) - right_best[indices].mean(axis=1),
        "f1": statistics.f1_samples(y, best.argmax(axis=1), indices, best.shape[1]),
    }
    if "roc_auc" in metrics and len(np.unique(y)) == best.shape[1]:
        samples["roc_auc"] = stratified_roc_auc(y, best, indices)
    tail = (1 - CONFIDENCE) / 2
    return {
        metric: tuple(np.quantile(samples[metric], [tail, 1 - tail])) if metric in samples else (None, None)
        for metric in METRICS
    }


def delong_logit(y: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """DeLong's variance of the (one-vs-rest, averaged) ROC AUC, from each image's placement values, with the
    interval on the logit scale."""
    n_classes = probabilities.shape[1]
    influence, aucs = np.zeros(len(y)), []
    for label in [1] if n_classes == 2 else range(n_classes):
        positive = y == label
        m, n = int(positive.sum()), int((~positive).sum())
        scores = probabilities[:, label]
        ranks = rankdata(scores)
        above = (ranks[positive] - rankdata(scores[positive])) / n  # share of negatives below each positive
        below = 1 - (ranks[~positive] - rankdata(scores[~positive])) / m  # share of positives above each negative
        auc = above.mean()
        aucs.append(auc)
        influence[positive] += (above - auc) / m * np.sqrt(m / max(m - 1, 1))
        influence[~positive] += (below - auc) / n * np.sqrt(n / max(n - 1, 1))
    auc, se = float(np.mean(aucs)), float(np.sqrt(np.sum((influence / len(aucs)) ** 2)))
    if not 0 < auc < 1 or se == 0:
        return auc, auc
    z, logit = float(norm.ppf(0.5 + CONFIDENCE / 2)), np.log(auc / (1 - auc))
    half = z * se / (auc * (1 - auc))
    return float(expit(logit - half)), float(expit(logit + half))


def alternative_intervals(
    y: np.ndarray, best: np.ndarray, other: np.ndarray, seed: int, metrics: tuple[str, ...]
) -> Intervals:
    """What the pipeline's intervals were chosen over: percentile bootstraps of the test images for accuracy and
    F1, a BCa bootstrap of the paired difference (scipy), DeLong's interval of ROC AUC on the logit scale."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(y), (RESAMPLES, len(y)))
    right_best, right_other = best.argmax(axis=1) == y, other.argmax(axis=1) == y
    tail = (1 - CONFIDENCE) / 2
    accuracy = tuple(np.quantile(right_best[indices].mean(axis=1), [tail, 1 - tail]))
    f1 = tuple(np.quantile(statistics.f1_samples(y, best.argmax(axis=1), indices, best.shape[1]), [tail, 1 - tail]))
    paired = bootstrap(
        (right_best.astype(float), right_other.astype(float)),
        lambda a, b, axis=-1: b.mean(axis=axis) - a.mean(axis=axis),
        paired=True,
        n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE,
        method="BCa",
        rng=rng,
    ).confidence_interval
    defined = np.bincount(y, minlength=best.shape[1]).min() >= statistics.MIN_CLASS_TEST_IMAGES
    return {
        "accuracy": accuracy,
        "difference": (paired.low, paired.high),
        "f1": f1 if defined else (None, None),
        "roc_auc": delong_logit(y, best) if defined else (None, None),
    }


METHODS: dict[str, Callable[..., Intervals]] = {
    "pipeline": pipeline_intervals,
    "alternative": alternative_intervals,
    "before": before_intervals,
}


def measure(
    setting: Setting, method: str, sets: int, seed: int = 0, fixed: bool = False, metrics: tuple[str, ...] = METRICS
) -> dict[str, dict[str, Any]]:
    """Per metric of `metrics`: the share of `sets` simulated test sets whose interval holds the true value,
    the mean width, and how many sets had no interval (undefined there)."""
    truth = true_values(setting)
    rng = np.random.default_rng(seed)
    held: dict[str, list[bool]] = {metric: [] for metric in metrics}
    widths: dict[str, list[float]] = {metric: [] for metric in metrics}
    for index in range(sets):
        y, best, other = draw(setting, rng, fixed=fixed)
        for metric, (low, high) in METHODS[method](y, best, other, seed + index, metrics).items():
            if metric not in metrics or low is None or high is None:
                continue
            held[metric].append(low <= truth[metric] <= high)
            widths[metric].append(high - low)
    return {
        metric: {
            "coverage": round(float(np.mean(held[metric])), 3) if held[metric] else None,
            "mean_width": round(float(np.mean(widths[metric])), 4) if widths[metric] else None,
            "undefined": sets - len(held[metric]),
            "true_value": round(truth[metric], 4),
        }
        for metric in metrics
    }


def table(report: dict[str, Any]) -> str:
    shown = lambda r: "undefined" if r["coverage"] is None else f"{r['coverage']:.3f} ({r['mean_width']:.4f})"  # noqa: E731
    lines = [
        f"{measured(report, NAME)}: {report['sets']} test sets per setting for the pipeline's "
        f"intervals, {report['before_sets']} for those before; coverage of the nominal 95% interval, mean width in "
        "brackets; `undefined`: the interval is not given there.",
        "",
        "| setting | design | metric | true value | pipeline | alternative | before |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        for metric in METRICS:
            after = row["pipeline"][metric]
            alternative, before = row.get("alternative", {}).get(metric), row.get("before", {}).get(metric)
            lines.append(
                f"| {row['description']} | {row['design']} | {metric} | {after['true_value']} | {shown(after)} | "
                f"{shown(alternative) if alternative else '–'} | {shown(before) if before else '–'} |"
            )
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(PAGE, NAME): table(report)}


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--sets", type=int, default=1000, help="simulated test sets per setting (default 1000)")
    parser.add_argument("--before-sets", type=int, default=200, help="sets for the intervals before (default 200)")
    parser.add_argument("--settings", default="abcd", help="which settings, e.g. ab (default abcd)")
    return parser


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name in args.settings:
        setting = settings()[name]
        for design, fixed in (("random", False), ("fixed", True)):
            started = time.perf_counter()
            row = {"setting": name, "description": setting.description, "design": design}
            row["pipeline"] = measure(setting, "pipeline", args.sets, fixed=fixed)
            if design == "random":
                row["alternative"] = measure(setting, "alternative", args.sets, fixed=fixed)
                row["before"] = measure(setting, "before", args.before_sets, fixed=fixed)
            rows.append(row)
            print(f"{name} {design}: {time.perf_counter() - started:.0f} s", flush=True)
    return stamp() | {"sets": args.sets, "before_sets": args.before_sets, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        report = measure_all(args)
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
