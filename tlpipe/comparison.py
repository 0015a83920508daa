"""The comparison of every evaluation: a table ranked by test accuracy, its markdown, summary and chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlpipe import pictures, statistics
from tlpipe.errors import markdown_cell
from tlpipe.evaluation import aligned, correct_by_path
from tlpipe.files import megabytes, read_json
from tlpipe.paths import SHIPPED_NAME, crossval_metrics, evaluation_dir

COLUMNS = [
    "backbone",
    "arch",
    "image_size",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "difference_to_best",
    "difference_ci_low",
    "difference_ci_high",
    "p_value",
    "verdict",
    "cv_accuracy_mean",
    "cv_accuracy_std",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "loss",
    "ece",
    "ece_calibrated",
    "n_test",
    "params",
    "size_bytes",
    "latency_ms_p50",
    "latency_ms_p95",
    "images_per_second",
]
# What a backbone costs where it ships (features@<b> measures the float32 base, evaluate@<b> adds the head).
# The fine-tuned model has its backbone's architecture, so its row shows its backbone's.
DEPLOYMENT_COLUMNS = ("size_bytes", "latency_ms_p50", "latency_ms_p95")
BEST, TIED, WORSE = "best", "tied with best", "worse"
# How the chart names `backbones.<b>.weights`; any other value is a weights file, named by its file name.
WEIGHTS_NAMES = {None: "random weights", "imagenet": "ImageNet", "noisy-student": "Noisy Student"}
# The two throughputs the chart shows, and how each is drawn: they measure different things.
FROZEN_SPEED = "frozen base: feature extraction"
SHIPPED_SPEED = "shipped model: end to end from files, one at a time"
FROZEN_STYLE = {"color": "tab:blue", "hatch": ""}
SHIPPED_STYLE = {"color": "tab:green", "hatch": "//", "edgecolor": "white"}


def comparison_table(params: dict[str, Any]) -> pd.DataFrame:
    """Every frozen backbone's row, plus the fine-tuned shipped model's row (backbone `model`), best first,
    each compared with the best row on the same test images (`difference_to_best`, `p_value`, `verdict`)."""
    rows = []
    for key, spec in params["backbones"].items():
        scores = read_json(evaluation_dir(key) / "metrics.json") | read_json(crossval_metrics(key))
        rows.append({"backbone": key, "arch": spec["arch"], "image_size": spec["image_size"]} | scores)
    shipped = params["backbones"][params["model"]]
    scores = read_json(evaluation_dir(SHIPPED_NAME) / "metrics.json")
    cost = next({c: row.get(c) for c in DEPLOYMENT_COLUMNS} for row in rows if row["backbone"] == params["model"])
    rows.append(
        scores
        | cost
        | {"backbone": SHIPPED_NAME, "arch": f"{shipped['arch']} fine-tuned", "image_size": shipped["image_size"]}
    )
    table = pd.DataFrame(rows)
    for column in DEPLOYMENT_COLUMNS:  # absent from evaluations written before they were measured
        if column not in table:
            table[column] = np.nan
    table = table.sort_values(["accuracy", "roc_auc", "backbone"], ascending=[False, False, True], kind="stable")
    table = table.reset_index(drop=True)
    table = table.join(paired_with_best(list(table["backbone"]), params["stats"]))
    return table[[c for c in COLUMNS if c in table.columns]]


def paired_with_best(names: list[str], stats: dict[str, Any]) -> pd.DataFrame:
    """Each row (in `names` order, best first) against the best row, on the same test images: the accuracy
    difference with its paired interval, McNemar's exact p and the verdict at `stats.alpha`."""
    best_csv = evaluation_dir(names[0]) / "predictions.csv"
    best = pd.read_csv(best_csv, keep_default_na=False)
    paths = list(best["path"])
    correct_best = aligned(correct_by_path(best_csv), paths, best_csv, best_csv)
    rows = []
    for name in names:
        csv = evaluation_dir(name) / "predictions.csv"
        correct = aligned(correct_by_path(csv), paths, csv, best_csv)
        paired = statistics.paired_comparison(correct_best, correct, stats["confidence"])
        if name == names[0]:
            verdict = BEST
        else:
            verdict = TIED if statistics.verdict(paired, stats["alpha"]) != "worse" else WORSE
        rows.append(
            {
                "difference_to_best": paired["difference"],
                "difference_ci_low": paired["difference_ci_low"],
                "difference_ci_high": paired["difference_ci_high"],
                "p_value": paired["p_value"],
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def recommendation(table: pd.DataFrame, params: dict[str, Any]) -> tuple[str, str]:
    """The cheapest backbone not significantly worse than the best (fastest extraction, then fewest
    parameters), and why, in one line."""
    best = table.iloc[0]
    alpha = params["stats"]["alpha"]
    against = f"the best ({best['backbone']}, accuracy {best['accuracy']:.4f}; McNemar at alpha {alpha})"
    candidates = table[(table["verdict"] != WORSE) & (table["backbone"] != SHIPPED_NAME)]
    if candidates.empty:
        key = params["model"]
        return key, f"{key}: only its fine-tuned model reaches {against}; every frozen backbone is worse"
    cheapest = candidates.sort_values(["images_per_second", "params"], ascending=[False, True], kind="stable")
    row = cheapest.iloc[0]
    which = (
        "the only frozen backbone"
        if len(candidates) == 1
        else f"the fastest feature extraction of the {len(candidates)} frozen backbones"
    )
    cost = f"{row['images_per_second']:.1f} images/s, {row['params'] / 1e6:.1f} M parameters"
    return row["backbone"], f"{row['backbone']} ({cost}): {which} not significantly worse than {against}"


def summary(table: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """The metric DVC shows for the whole study: the winner, what is tied with it, the recommendation, and
    each row's headline numbers."""
    best = table.iloc[0]
    recommended, reason = recommendation(table, params)
    return {
        "best": best["backbone"],
        "best_accuracy": float(best["accuracy"]),
        "tied_with_best": ", ".join(table["backbone"][table["verdict"] == TIED]),
        "recommended": recommended,
        "recommended_reason": reason,
        "backbones": {
            row["backbone"]: {k: None if pd.isna(row[k]) else row[k] for k in ("accuracy", "f1", "roc_auc", "loss")}
            for row in table.to_dict("records")
        },
    }


def shown_number(value: Any, pattern: str) -> str:
    """A number as `pattern` writes it; `–` for a value that does not exist (NaN, None) instead of `nan`."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return pattern.format(value)


def markdown(table: pd.DataFrame, params: dict[str, Any]) -> str:
    # Escaped although params.py allows no `|` in either today: the table must not depend on that staying so.
    names = {column: [markdown_cell(str(value)) for value in table[column]] for column in ("backbone", "arch")}
    shown = pd.DataFrame(names | {"image_size": table["image_size"]})
    shown["accuracy [95% CI]"] = [
        f"{a:.4f} [{low:.4f}, {high:.4f}]"
        for a, low, high in zip(table["accuracy"], table["accuracy_ci_low"], table["accuracy_ci_high"])
    ]
    shown["vs best [CI]"] = [
        "–" if verdict == BEST else f"{d:+.4f} [{low:+.4f}, {high:+.4f}]"
        for d, low, high, verdict in zip(
            table["difference_to_best"], table["difference_ci_low"], table["difference_ci_high"], table["verdict"]
        )
    ]
    shown["McNemar p"] = ["–" if v == BEST else f"{p:.3g}" for p, v in zip(table["p_value"], table["verdict"])]
    shown["verdict"] = table["verdict"]
    if "cv_accuracy_mean" in table:
        shown["cv accuracy"] = [
            shown_number(m, "{:.4f}") + ("" if np.isnan(s) else f" ± {s:.4f}")
            for m, s in zip(table["cv_accuracy_mean"], table["cv_accuracy_std"])
        ]
    for column in ("f1", "roc_auc", "loss", "ece", "ece_calibrated"):
        shown[column] = [shown_number(v, "{:.4f}") for v in table[column]]
    shown["params"] = (table["params"] / 1e6).map("{:.1f} M".format)
    shown["size"] = ["–" if pd.isna(v) else megabytes(v) for v in table["size_bytes"]]
    shown["latency p50 / p95"] = [
        f"{shown_number(p50, '{:.1f}')} / {shown_number(p95, '{:.1f}')} ms"
        for p50, p95 in zip(table["latency_ms_p50"], table["latency_ms_p95"])
    ]
    shown["images_per_second"] = table["images_per_second"].map("{:.1f}".format)
    recommended, reason = recommendation(table, params)
    stats = params["stats"]
    few = table["n_test"].min() < statistics.FEW_TEST_IMAGES
    return (
        "# Backbone comparison\n\nTest split, ranked by accuracy. `model` is the shipped, fine-tuned model. "
        f"Intervals are {stats['confidence']:.0%} intervals (Wilson's score interval for accuracy). "
        "Every row is compared with the best one on the same test images: `vs best` is the accuracy difference "
        f"with its paired interval (Newcombe's), and a row whose McNemar p is at least {stats['alpha']} is "
        "`tied with best`, its difference too small to tell from chance. `cv accuracy` is repeated stratified "
        "k-fold of the head on train+val (mean ± std). `ece` is the expected calibration error as trained, "
        "`ece_calibrated` after temperature scaling fitted on val. `size` is the float32 base's weights file "
        "plus the head's; `latency` is one image through the float32 base on this machine (median and 95th "
        "percentile; for `model`, its backbone's: the same architecture). `images_per_second` is the frozen "
        "base's feature extraction throughput on this machine, in batches (for `model`: end to end from "
        "image files, one at a time). The chart `pareto.png` plots accuracy against latency.\n\n"
        + shown.to_markdown(index=False, disable_numparse=True)
        + f"\n\n**Recommended: {recommended}.** {reason}.\n"
        + (
            f"\nOnly {int(table['n_test'].min())} test images: the intervals are wide, and differences "
            "between rows are rarely significant.\n"
            if few
            else ""
        )
    )


def weights_name(weights: str | None) -> str:
    """`ImageNet`, `random weights`, or `weights: <file name>` for a weights file."""
    if weights in WEIGHTS_NAMES:
        return WEIGHTS_NAMES[weights]
    return f"weights: {Path(str(weights)).name}"


def row_labels(table: pd.DataFrame, params: dict[str, Any] | None) -> list[str]:
    """What each row is: `<key> (<arch>, <weights>, frozen)`, or `model = <key> fine-tuned (shipped)`.

    Without params the weights are unknown and left out.
    """
    labels = []
    for key, arch in zip(table["backbone"], table["arch"]):
        if key == SHIPPED_NAME:
            base = params["model"] if params else str(arch).removesuffix(" fine-tuned")
            labels.append(f"model = {base} fine-tuned (shipped)")
        else:
            weights = f", {weights_name(params['backbones'][key]['weights'])}" if params else ""
            labels.append(f"{key} ({arch}{weights}, frozen)")
    return labels


def chart_title(params: dict[str, Any] | None) -> str:
    """Says ImageNet only when every backbone (the shipped model's included) started from ImageNet weights."""
    weights = {spec["weights"] for spec in params["backbones"].values()} if params else set()
    frozen = "Frozen ImageNet backbones" if weights == {"imagenet"} else "Frozen backbones"
    return f"{frozen} and the fine-tuned shipped model, ranked by test accuracy"


def chart(table: pd.DataFrame, path: Path, params: dict[str, Any] | None = None) -> None:
    """Accuracy and throughput per row, best on top; the shipped model's bars are hatched and explained."""
    pictures.save_png(chart_figure(table, params), path, dpi=100)


def pareto_front(latency: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Which rows no other row beats: none is at least as accurate and at least as fast, and better in one."""
    latency, accuracy = np.asarray(latency, float), np.asarray(accuracy, float)
    no_worse = (latency[np.newaxis, :] <= latency[:, np.newaxis]) & (accuracy[np.newaxis, :] >= accuracy[:, np.newaxis])
    better = (latency[np.newaxis, :] < latency[:, np.newaxis]) | (accuracy[np.newaxis, :] > accuracy[:, np.newaxis])
    return ~(no_worse & better).any(axis=1)


def pareto_chart(table: pd.DataFrame, path: Path) -> None:
    """Accuracy (with its interval) against single-image latency, one point per row; the rows no other row
    beats on both are joined: the choices worth making. Rows without a latency (an old cache) are left out."""
    rows = table[table["latency_ms_p50"].notna()].reset_index(drop=True)
    fig, ax = pictures.pyplot().subplots(figsize=(9, 6), layout="constrained")
    latency, accuracy = rows["latency_ms_p50"].to_numpy(float), rows["accuracy"].to_numpy(float)
    errors = np.array([accuracy - rows["accuracy_ci_low"], rows["accuracy_ci_high"] - accuracy])
    front = pareto_front(latency, accuracy)
    shipped = (rows["backbone"] == SHIPPED_NAME).to_numpy()
    for part, style, label in ((~shipped, FROZEN_STYLE, "frozen backbone"), (shipped, SHIPPED_STYLE, "shipped model")):
        if part.any():
            ax.errorbar(
                latency[part],
                accuracy[part],
                yerr=errors[:, part],
                fmt="o",
                capsize=3,
                color=style["color"],
                label=label,
            )
    order = np.argsort(latency[front])
    ax.plot(latency[front][order], accuracy[front][order], "--", color="grey", label="not beaten on both")
    for x, y, name in zip(latency, accuracy, rows["backbone"]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    plain = pictures.pyplot().FuncFormatter(lambda value, _: f"{value:g}")  # 20, not 2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("latency of one image, median (ms, log scale; this machine)")
    ax.set_ylabel("test accuracy (bars: 95% interval)")
    ax.legend(fontsize=9)
    pictures.figure_title(fig, "Accuracy against deployment latency")
    pictures.save_png(fig, path, dpi=100)


def chart_figure(table: pd.DataFrame, params: dict[str, Any] | None) -> Any:
    rows = table.iloc[::-1].reset_index(drop=True)  # barh draws bottom up: the best row goes on top
    shipped = (rows["backbone"] == SHIPPED_NAME).to_numpy()
    y = np.arange(len(rows))
    fig, (acc_ax, speed_ax) = pictures.pyplot().subplots(
        1, 2, figsize=(13, 0.5 * len(rows) + 2.6), sharey=True, layout="constrained"
    )
    errors = np.array([rows["accuracy"] - rows["accuracy_ci_low"], rows["accuracy_ci_high"] - rows["accuracy"]])
    for part, style, speed in ((~shipped, FROZEN_STYLE, FROZEN_SPEED), (shipped, SHIPPED_STYLE, SHIPPED_SPEED)):
        if part.any():
            acc_ax.barh(y[part], rows["accuracy"][part], xerr=errors[:, part], capsize=3, **style)
            speed_ax.barh(y[part], rows["images_per_second"][part], label=speed, **style)
    acc_ax.set_yticks(y, row_labels(rows, params))
    low = max(0.0, float(rows["accuracy_ci_low"].min()) - 0.05)
    acc_ax.set_xlim(low, 1.0 + 0.45 * (1.0 - low))  # room for the value and verdict printed after a bar at 1.0
    acc_ax.set_xlabel("test accuracy (bars: 95% interval; verdict against the best row)")
    for row, value, high, verdict in zip(y, rows["accuracy"], rows["accuracy_ci_high"], rows["verdict"]):
        acc_ax.text(high, row, f" {value:.3f} {verdict}", va="center", fontsize=8)
    speed_ax.set_xlabel("images/s (what is timed: see legend)")
    speed_ax.set_xlim(0, float(rows["images_per_second"].max()) * 1.15)
    for row, value in zip(y, rows["images_per_second"]):
        speed_ax.text(value, row, f" {value:.0f}", va="center", fontsize=9)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    pictures.figure_title(fig, chart_title(params))
    return fig
