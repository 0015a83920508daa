"""Time and memory of the data audit's searches as the dataset grows: `python -m benchmarks.audit`.

For n = 3,000, 12,000 and 30,000 images it times, in this process:
- the exact near-duplicate search (tlpipe.audit.similar_pairs, in blocks), with planted near copies that it
  must all find at the threshold of params.yaml, and no other pair;
- the outlier search (cleanlab's OutOfDistribution through tlpipe.audit.outlier_scores);
- the label-issue ranking (cleanlab's confident learning through tlpipe.audit.label_issues);
and records each one's peak extra memory as tracemalloc sees it (NumPy reports its arrays to it), besides
the features themselves. Features are synthetic, 1,280 wide like MobileNetV2's pooled features and
non-negative like them; what the searches cost depends on n and the width, not on the values.
Hashing the files and drawing the grids are left out: they are linear in n.

Writes benchmarks/audit.json and its table into docs/audit.md and docs/performance.md (the `audit` markers).
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import yaml

from benchmarks import (
    PROJECT_ROOT,
    Block,
    benchmark_parser,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from tlpipe import audit

NAME = "audit"
WIDTH = 1280
PLANTED = 100  # near copies planted per run
PAGES = ("docs/audit.md", "docs/performance.md")


def default_threshold() -> float:
    return float(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["audit"]["near_duplicate_threshold"])


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000, 30000], help="numbers of images")
    parser.add_argument("--threshold", type=float, default=None, help="near-duplicate cosine (default: params.yaml)")
    return parser


def measure_one(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra MB allocated while it ran)."""
    tracemalloc.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Features of n images, PLANTED of them near copies (each feature within 10%) of others, and splits."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, WIDTH))).astype(np.float32)
    sources = rng.choice(n // 2, PLANTED, replace=False)
    copies = rng.choice(np.arange(n // 2, n), PLANTED, replace=False)
    x[copies] = x[sources] * rng.uniform(0.9, 1.1, size=(PLANTED, WIDTH)).astype(np.float32)
    splits = np.array(["train"] * (n - n // 3) + ["val"] * (n // 6) + ["test"] * (n // 3 - n // 6))[:n]
    return x, splits, list(zip(sources.tolist(), copies.tolist()))


def run(n: int, threshold: float, seed: int) -> dict[str, Any]:
    x, splits, planted = synthetic(n, seed)
    unit = audit.unit_rows(x)
    del x
    similar, search_s, search_mb = measure_one(lambda: audit.similar_pairs(unit, splits, threshold))
    pairs = {(min(a, b), max(a, b)) for a, b in planted}
    planted_similarity = [float(unit[a] @ unit[b]) for a, b in pairs]
    _, outlier_s, outlier_mb = measure_one(lambda: audit.outlier_scores(unit, splits == "train"))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probabilities = np.clip(np.eye(2)[labels] * 0.9 + rng.uniform(0, 0.1, (n, 2)), 0, 1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    images = audit.Images([f"{i}.jpg" for i in range(n)], splits, labels)
    _, label_s, label_mb = measure_one(lambda: audit.label_issues(images, probabilities, ["a", "b"]))
    found = set(zip(similar.i.tolist(), similar.j.tolist()))
    return {
        "n": n,
        "features_mb": round(unit.nbytes / 2**20, 1),
        "search_s": round(search_s, 2),
        "search_mb": round(search_mb, 1),
        "planted_recall": len(found & pairs) / len(pairs),
        "other_pairs_found": similar.pairs - len(found & pairs),
        "lowest_planted_similarity": round(min(planted_similarity), 4),
        "outliers_s": round(outlier_s, 2),
        "outliers_mb": round(outlier_mb, 1),
        "label_issues_s": round(label_s, 2),
        "label_issues_mb": round(label_mb, 1),
    }


COLUMNS = {
    "images": "images",
    "features_mb": "features (MB)",
    "search_s": "near-duplicate search (s)",
    "search_mb": "its extra memory (MB)",
    "recall": "planted found",
    "other_pairs_found": "other pairs found",
    "outliers_s": "outliers (s)",
    "outliers_mb": "its extra memory (MB)",
    "label_issues_s": "label issues (s)",
    "label_issues_mb": "their extra memory (MB)",
}


def table(report: dict[str, Any]) -> str:
    rows = [
        r
        | {key: f"{r[key]:.2f}" for key in ("search_s", "outliers_s", "label_issues_s")}
        | {key: f"{r[key]:.0f}" for key in ("features_mb", "search_mb", "outliers_mb", "label_issues_mb")}
        | {"images": f"{r['n']:,}", "recall": f"{r['planted_recall']:.0%}"}
        for r in report["rows"]
    ]
    first, last = report["rows"][0], report["rows"][-1]
    scale = last["n"] / first["n"]
    lines = [
        f"{measured(report, NAME)}: synthetic features {report['width']} wide, {report['planted']} planted near "
        f"copies per run (every feature within 10% of its source), near-duplicate threshold {report['threshold']}; "
        f"extra memory is the peak that tracemalloc saw besides the features. The run took "
        f"{report['seconds']:.0f} s, and its process peaked at {report['peak_rss_mb']:,} MB RSS.",
        "",
        markdown(rows, COLUMNS),
        "",
        f"The planted copies' lowest cosine was {min(r['lowest_planted_similarity'] for r in report['rows']):.3f}.",
    ]
    if last["n"] > first["n"]:
        lines[-1] += (
            f" From {first['n']:,} to {last['n']:,} images ({scale:.0f}x, {scale**2:.0f}x the pairs) the "
            f"near-duplicate search took {last['search_s'] / first['search_s']:.0f}x as long, the outlier search "
            f"{last['outliers_s'] / first['outliers_s']:.0f}x and the label-issue ranking "
            f"{last['label_issues_s'] / first['label_issues_s']:.0f}x; the whole similarity matrix would take "
            f"{last['n'] ** 2 * 4 / 2**20:,.0f} MB at {last['n']:,} images."
        )
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        threshold = args.threshold if args.threshold is not None else default_threshold()
        started = time.perf_counter()
        run(200, threshold, seed=0)  # imports cleanlab and scikit-learn outside the measurements
        rows = []
        for n in args.sizes:
            rows.append(run(n, threshold, seed=n))
            print(rows[-1], flush=True)
        report = stamp() | {
            "width": WIDTH,
            "planted": PLANTED,
            "threshold": threshold,
            "seconds": round(time.perf_counter() - started, 1),
            # This process's own peak (ru_maxrss is in KB on Linux): features, searches and libraries together.
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rows": rows,
        }
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
