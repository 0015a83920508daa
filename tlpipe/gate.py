"""The metric gate: compare the workspace's metrics with a git revision's, under params.yaml `regression:`.

Both sides are read through DVC (every metrics file dvc.yaml declares, at the revision and in the workspace), so
that a file DVC cannot read is reported by name instead of looking like metrics that vanished. Each metric gets
a verdict, and the whole a Markdown table. The gate fails closed: a value that is not a finite number where a
number belongs, or a file that cannot be read, never passes.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tlpipe.errors import first_line, markdown_cell, markdown_code

OK, REGRESSED, NEW, MISSING, IGNORED, CHANGED = "ok", "REGRESSED", "new", "MISSING", "ignored", "changed"
FAILING = {REGRESSED, MISSING}
WORKSPACE = "workspace"  # DVC's name for the working tree among revisions
# How much of an odd value a reason quotes: enough to recognise it, short enough for a table cell.
QUOTED_CHARS = 40
# DVC's message for a corrupted file starts with a path relative to its own internal folder, not the user's.
DVC_PATH_PREFIX = re.compile(r"^unable to read: '[^']*',\s*")

Diff = dict[str, dict[str, dict[str, Any]]]  # {file: {metric: {"old": value, "new": value}}}


class BaselineError(Exception):
    """The baseline revision or its metrics cannot be read."""


@dataclass(frozen=True)
class Comparison:
    """The metrics of both sides, and the workspace files that could not be read ({file: why})."""

    diff: Diff
    unreadable: dict[str, str]


@dataclass(frozen=True)
class Row:
    metric: str
    backbone: str
    old: Any
    new: Any
    change: float | None
    allowed: str
    verdict: str
    reason: str = ""  # why a value could not be judged, for a REGRESSED row that is not a plain regression


def check_revision(baseline: str) -> None:
    """Refuse a revision that a command line would take for an option, before anything reads it."""
    if not baseline.strip():
        raise BaselineError("--baseline is empty; give a git revision (a branch, a tag or a commit)")
    if baseline.startswith("-"):
        raise BaselineError(
            f"--baseline {baseline!r} starts with '-', which no git revision does; give a branch, a tag or a commit"
        )


def metrics_diff(baseline: str) -> Comparison:
    """Every declared metric at `baseline` and in the workspace, as DVC reads them, compared file by file."""
    check_revision(baseline)
    results = read_revisions(baseline)
    old = baseline_result(results, baseline)
    new = results.get(WORKSPACE, {})
    if new.get("error") is not None:
        return Comparison({}, {WORKSPACE: f"the workspace's metrics cannot be read ({dvc_reason(new['error'])})"})
    old_files, old_errors = split_files(old)
    if old_errors:
        file, why = next(iter(sorted(old_errors.items())))
        raise BaselineError(f"baseline {baseline!r}: {file} cannot be read ({why}); choose another --baseline")
    if not any(old_files.values()):
        raise BaselineError(
            f"baseline {baseline!r} has no metrics to compare with; after your first run, commit its results "
            "(git add dvc.lock metrics reports && git commit), or choose another --baseline"
        )
    new_files, new_errors = split_files(new)
    return Comparison(diff_files(old_files, new_files, skip=set(new_errors)), new_errors)


def read_revisions(baseline: str) -> dict[str, dict[str, Any]]:
    """DVC's reading of the metrics at `baseline` and in the workspace: {revision: {"data" or "error": ...}}.

    Through DVC's library rather than `dvc metrics diff --json`, whose output drops the per-file errors: a
    corrupted file there looks like a file whose metrics all vanished, or on the baseline side all new.
    """
    from dvc.repo import Repo

    # DVC logs a revision it cannot read as a warning; the gate reports it itself, in one line.
    logging.getLogger("dvc").addHandler(logging.NullHandler())
    try:
        with Repo() as repo:
            if repo.scm.no_commits:
                return {}
            return repo.metrics.show(revs=[baseline, WORKSPACE], hide_workspace=False, on_error="return")
    except Exception as error:  # noqa: BLE001 - DVC and git fail in many ways; each means "cannot compare"
        raise BaselineError(f"baseline {baseline!r} cannot be read: {first_line(error)}") from None


def baseline_result(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """The baseline's result: DVC names it by every name of its commit, so it is the one that is not the
    workspace; empty when the revision predates the DVC project."""
    others = [result for name, result in results.items() if name != WORKSPACE]
    result = results.get(baseline, others[0] if others else {"data": {}})
    if result.get("error") is not None:
        raise BaselineError(f"baseline {baseline!r} cannot be read: {dvc_reason(result['error'])}")
    return result


def split_files(result: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({file: flat metrics}, {file: why it cannot be read}); a file that does not exist is neither."""
    files: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for path, entry in (result.get("data") or {}).items():
        file = shown_path(path)
        error = entry.get("error")
        if isinstance(error, FileNotFoundError):
            continue  # not written yet, or removed: its metrics count as new or missing
        if error is not None:
            errors[file] = dvc_reason(error)
        elif not isinstance(entry.get("data"), dict):
            errors[file] = f"holds {type(entry.get('data')).__name__}, not a mapping of metrics"
        else:
            files[file] = flatten(entry["data"])
    return files, errors


def shown_path(path: str) -> str:
    """A repository path as the user sees it from the working folder, in forward slashes."""
    return Path(path).as_posix()


def dvc_reason(error: BaseException) -> str:
    return DVC_PATH_PREFIX.sub("", first_line(error))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as DVC names them: `backbones.vgg16.accuracy`."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def diff_files(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], skip: set[str]) -> Diff:
    """Both sides' values of every metric of every file but `skip` (files that cannot be read)."""
    diff: Diff = {}
    for file in sorted((old.keys() | new.keys()) - skip):
        before, after = old.get(file, {}), new.get(file, {})
        diff[file] = {
            metric: {"old": before.get(metric), "new": after.get(metric)}
            for metric in sorted(before.keys() | after.keys())
        }
    return diff


def unreadable_line(file: str, why: str) -> str:
    """One line for a workspace metrics file that cannot be read."""
    if file == WORKSPACE:
        return why
    return f"{file} cannot be read ({why}); rerun the stage that writes it (dvc repro)"


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
    if interval is None or any(is_number(v) is not True for v in interval):
        return False  # no interval to judge by: the absolute tolerance alone decides
    low, high = interval
    return low - 1e-12 <= new <= high + 1e-12


def is_number(value: Any) -> bool | str:
    """True for a finite number; False for a value that is no number at all (a name such as summary's
    `best`); for a number that cannot be compared (NaN, infinite, too large for a float), why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return f"too large to compare: {shortened(value)}"
    return True if finite else f"not a finite number: {shortened(value)}"


def shortened(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= QUOTED_CHARS else f"{text[: QUOTED_CHARS - 1]}…"


def unusable(old: Any, new: Any) -> str:
    """Why the pair cannot be judged, or "": a NaN or infinite value on either side, or a number on one side
    and something else on the other. Two names (`best`: vgg16 -> mobilenet) are compared as they are."""
    checks = {"baseline": (old, is_number(old)), "new": (new, is_number(new))}
    for side, (_, check) in checks.items():
        if isinstance(check, str):
            return f"{side} value {check}"
    numeric = [value is not None and check is True for value, check in checks.values()]
    if any(numeric) and old is not None and new is not None and not all(numeric):
        side, value = ("new", new) if numeric[0] else ("baseline", old)
        return f"{side} value not a number: {shortened(value)}"
    return ""


def judge(
    metric: str, backbone: str, old: Any, new: Any, rule: dict[str, Any], interval: tuple[Any, Any] | None = None
) -> Row:
    """`interval`: the baseline's (low, high) confidence interval of this metric, for `noise: interval`.

    An ignored metric is never judged, not even a NaN one: its rule says that its value does not matter.
    """
    reason = "" if rule.get("ignore") else unusable(old, new)
    numeric = not reason and all(is_number(v) is True for v in (old, new))
    change = round(new - old, 6) if numeric else None
    if old is not None and new is None:
        verdict = MISSING
    elif rule.get("ignore"):
        verdict = IGNORED
    elif reason:
        verdict = REGRESSED
    elif old is None:
        verdict = NEW
    elif not numeric:
        verdict = OK if old == new else CHANGED
    else:
        dropped = "max_drop" in rule and -change > rule["max_drop"] + 1e-12
        rose = "max_rise" in rule and change > rule["max_rise"] + 1e-12
        noise = rule.get("noise") == "interval" and inside_baseline_interval(new, interval)
        verdict = REGRESSED if (dropped or rose) and not noise else OK
    allowed = "–" if isinstance(old, str) or isinstance(new, str) else describe(rule)
    return Row(metric, backbone, old, new, change, allowed, verdict, reason if verdict == REGRESSED else "")


def judge_all(diff: Diff, rules: dict[str, dict[str, Any]]) -> list[Row]:
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


def headline(rows: list[Row], unreadable: int = 0) -> str:
    """`no regressions`, or the failures by kind: a metric that is gone is missing, not regressed."""
    counts = {verdict: sum(row.verdict == verdict for row in rows) for verdict in (REGRESSED, MISSING)}
    failed = [f"**{count} {verdict.lower()}**" for verdict, count in counts.items() if count]
    if unreadable:
        failed.append(f"**{unreadable} unreadable file{'s' if unreadable > 1 else ''}**")
    if counts[MISSING] and counts[MISSING] == len(rows):
        failed.append("(no metrics in the workspace: run dvc repro)")
    return ", ".join(failed) if failed else "no regressions"


def cell(value: Any) -> str:
    """Text for one Markdown table cell: a `|` or a line break in a name or value would split the row."""
    return markdown_cell(str(value))


def markdown(rows: list[Row], baseline: str, unreadable: dict[str, str] | None = None) -> str:
    def show(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, int) and len(str(value)) > QUOTED_CHARS:
            return shortened(value)  # an integer of hundreds of digits would stretch the table
        return f"{value:.4f}" if isinstance(value, float) else cell(value)

    lines = [
        f"### Metrics against {markdown_code(baseline)}: {headline(rows, len(unreadable or {}))}",
        "",
        *(f"- **{cell(unreadable_line(file, why))}**" for file, why in sorted((unreadable or {}).items())),
        *([""] if unreadable else []),
        "| metric | backbone | old | new | change | allowed | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        change = "" if row.change is None else f"{row.change:+.4f}"
        verdict = f"**{row.verdict}**" if row.verdict in FAILING else row.verdict
        if row.reason:
            verdict += f" ({cell(row.reason)})"
        lines.append(
            f"| {cell(row.metric)} | {cell(row.backbone)} | {show(row.old)} | {show(row.new)} | {change} "
            f"| {row.allowed} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
