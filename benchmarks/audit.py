"""Time and memory of the data audit's searches as the dataset grows: `python -m benchmarks.audit`.

For n = 3,000, 12,000 and 30,000 images it times, in this process:
- the exact near-duplicate search (tlpipe.audit.similar_pairs, in blocks), with planted near copies that it
  must all find;
- the outlier search (cleanlab's OutOfDistribution through tlpipe.audit.outlier_scores);
- the label-issue ranking (cleanlab's confident learning through tlpipe.audit.label_issues);
and records each one's peak extra memory as tracemalloc sees it (NumPy reports its arrays to it), besides
the features themselves. Features are synthetic, 1,280 wide like MobileNetV2's pooled features and
non-negative like them; what the searches cost depends on n and the width, not on the values.
Hashing the files and drawing the grids are left out: they are linear in n and took a second at 3,000 images.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from tlpipe import audit

WIDTH = 1280
PLANTED = 100  # near copies planted per run


def measured(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra MB allocated while it ran)."""
    tracemalloc.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, WIDTH))).astype(np.float32)
    sources = rng.choice(n // 2, PLANTED, replace=False)
    copies = rng.choice(np.arange(n // 2, n), PLANTED, replace=False)
    x[copies] = x[sources] * rng.uniform(0.9, 1.1, size=(PLANTED, WIDTH)).astype(np.float32)
    splits = np.array(["train"] * (n - n // 3) + ["val"] * (n // 6) + ["test"] * (n // 3 - n // 6))[:n]
    return x, splits, list(zip(sources.tolist(), copies.tolist()))


def run(n: int, threshold: float, seed: int) -> dict[str, float]:
    x, splits, planted = synthetic(n, seed)
    unit = audit.unit_rows(x)
    del x
    similar, search_s, search_mb = measured(lambda: audit.similar_pairs(unit, splits, threshold))
    found = set(zip(similar.i.tolist(), similar.j.tolist()))
    recall = sum((min(a, b), max(a, b)) in found for a, b in planted) / len(planted)
    _, outlier_s, outlier_mb = measured(lambda: audit.outlier_scores(unit, splits == "train"))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probabilities = np.clip(np.eye(2)[labels] * 0.9 + rng.uniform(0, 0.1, (n, 2)), 0, 1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    images = audit.Images([f"{i}.jpg" for i in range(n)], splits, labels)
    _, label_s, label_mb = measured(lambda: audit.label_issues(images, probabilities, ["a", "b"]))
    return {
        "n": n,
        "features_mb": unit.nbytes / 2**20,
        "search_s": search_s,
        "search_mb": search_mb,
        "planted_recall": recall,
        "outliers_s": outlier_s,
        "outliers_mb": outlier_mb,
        "label_issues_s": label_s,
        "label_issues_mb": label_mb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000, 30000])
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args(argv)
    run(200, args.threshold, seed=0)  # imports cleanlab and scikit-learn outside the measurements
    rows = [run(n, args.threshold, seed=n) for n in args.sizes]
    print(
        "| images | features (MB) | near-duplicate search (s) | its extra memory (MB) | planted found | "
        "outliers (s) | extra (MB) | label issues (s) | extra (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['features_mb']:.0f} | {r['search_s']:.1f} | {r['search_mb']:.0f} | "
            f"{r['planted_recall']:.0%} | {r['outliers_s']:.1f} | {r['outliers_mb']:.0f} | "
            f"{r['label_issues_s']:.2f} | {r['label_issues_mb']:.0f} |"
        )
    first, last = rows[0], rows[-1]
    scale = last["n"] / first["n"]
    print(
        f"\n{last['n']:,} against {first['n']:,} images ({scale:.0f}x): search {last['search_s'] / first['search_s']:.0f}x, "
        f"outliers {last['outliers_s'] / first['outliers_s']:.0f}x (both compare every pair: {scale**2:.0f}x "
        f"the pairs), label issues {last['label_issues_s'] / first['label_issues_s']:.0f}x"
    )


if __name__ == "__main__":
    main()
