"""The metric gate: compare the workspace's metrics with a git revision's, under params.yaml `regression:`.

The comparison comes from `dvc metrics diff --json`; each metric gets a verdict, and the whole a Markdown table.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

OK, REGRESSED, NEW, MISSING, IGNORED, CHANGED = "ok", "REGRESSED", "new", "MISSING", "ignored", "changed"
FAILING = {REGRESSED, MISSING}


class BaselineError(Exception):
    """The baseline revision or its metrics cannot be read."""


@dataclass(frozen=True)
class Row:
    metric: str
    backbone: str
    old: Any
    new: Any
    change: float | None
    allowed: str
    verdict: str


def metrics_diff(baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """DVC's own comparison of every declared metric: {file: {metric: {old, new}}}."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", baseline, "--all", "--json"],
        capture_output=True,
        text=True,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    if result.returncode != 0 or errors:
        reason = errors[0].removeprefix("ERROR: ") if errors else result.stderr.strip().splitlines()[-1:]
        raise BaselineError(f"baseline {baseline!r} cannot be read: {reason}")
    diff = json.loads(result.stdout or "{}")
    if not any(values.get("old") is not None for metrics in diff.values() for values in metrics.values()):
        raise BaselineError(
            f"baseline {baseline!r} has no metrics to compare with; after your first run, commit its results "
            "(git add dvc.lock metrics reports && git commit), or choose another --baseline"
        )
    return diff


def tolerance(metric: str, rules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rule for a metric, by its last name part (`backbones.vgg16.accuracy` -> `accuracy`): the rule of
    that exact name, else the first pattern (`*_ci_*`) that matches it, else `default`."""
    name = metric.rsplit(".", 1)[-1]
    if name in rules:
        return rules[name]
    patterns = [rule for pattern, rule in rules.items() if any(c in pattern for c in "*?[") and fnmatch(name, pattern)]
    return patterns[0] if patterns else rules["default"]


def describe(rule: dict[str, Any]) -> str:
    if rule.get("ignore"):
        return "ignored"
    parts = [
        f"drop ≤ {rule['max_drop']}" if "max_drop" in rule else "",
        f"rise ≤ {rule['max_rise']}" if "max_rise" in rule else "",
        "or inside the baseline's interval" if rule.get("noise") == "interval" else "",
    ]
    return ", ".join(p for p in parts if p) or "any change"


def inside_baseline_interval(new: float, interval: tuple[Any, Any] | None) -> bool:
    """Whether a new value stays within the baseline's own confidence interval."""
    if interval is None or any(not isinstance(v, (int, float)) for v in interval):
        return False  # no interval to judge by: the absolute tolerance alone decides
    low, high = interval
    return low - 1e-12 <= new <= high + 1e-12


def judge(
    metric: str, backbone: str, old: Any, new: Any, rule: dict[str, Any], interval: tuple[Any, Any] | None = None
) -> Row:
    """`interval`: the baseline's (low, high) confidence interval of this metric, for `noise: interval`."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    change = round(new - old, 6) if numeric else None
    if old is None and new is not None:
        verdict = NEW
    elif new is None:
        verdict = MISSING
    elif rule.get("ignore"):
        verdict = IGNORED
    elif not numeric:
        verdict = OK if old == new else CHANGED
    elif any(math.isnan(v) for v in (old, new)):
        verdict = OK if math.isnan(old) == math.isnan(new) else CHANGED
    else:
        dropped = "max_drop" in rule and -change > rule["max_drop"] + 1e-12
        rose = "max_rise" in rule and change > rule["max_rise"] + 1e-12
        noise = rule.get("noise") == "interval" and inside_baseline_interval(new, interval)
        verdict = REGRESSED if (dropped or rose) and not noise else OK
    allowed = "–" if isinstance(old, str) or isinstance(new, str) else describe(rule)
    return Row(metric, backbone, old, new, change, allowed, verdict)


def judge_all(diff: dict[str, dict[str, dict[str, Any]]], rules: dict[str, dict[str, Any]]) -> list[Row]:
    rows = [
        judge(
            metric,
            Path(file).stem,
            values.get("old"),
            values.get("new"),
            tolerance(metric, rules),
            baseline_interval(metrics, metric),
        )
        for file, metrics in sorted(diff.items())
        for metric, values in sorted(metrics.items())
    ]
    order = {REGRESSED: 0, MISSING: 0, NEW: 1, CHANGED: 1}
    return sorted(rows, key=lambda row: (order.get(row.verdict, 2), row.backbone, row.metric))


def baseline_interval(metrics: dict[str, dict[str, Any]], metric: str) -> tuple[Any, Any] | None:
    """The baseline's `<metric>_ci_low` and `_ci_high` from the same file, when it has them."""
    low, high = metrics.get(f"{metric}_ci_low", {}), metrics.get(f"{metric}_ci_high", {})
    if low.get("old") is None or high.get("old") is None:
        return None
    return low["old"], high["old"]


def headline(rows: list[Row]) -> str:
    """`no regressions`, or the failures by kind: a metric that is gone is missing, not regressed."""
    counts = {verdict: sum(row.verdict == verdict for row in rows) for verdict in (REGRESSED, MISSING)}
    failed = [f"**{count} {verdict.lower()}**" for verdict, count in counts.items() if count]
    if counts[MISSING] and counts[MISSING] == len(rows):
        failed.append("(no metrics in the workspace: run dvc repro)")
    return ", ".join(failed) if failed else "no regressions"


def markdown(rows: list[Row], baseline: str) -> str:
    def show(value: Any) -> str:
        if value is None:
            return "–"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"### Metrics against `{baseline}`: {headline(rows)}",
        "",
        "| metric | backbone | old | new | change | allowed | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        change = "" if row.change is None else f"{row.change:+.4f}"
        verdict = f"**{row.verdict}**" if row.verdict in FAILING else row.verdict
        lines.append(
            f"| {row.metric} | {row.backbone} | {show(row.old)} | {show(row.new)} | {change} | {row.allowed} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
