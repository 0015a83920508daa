"""The comparison of every evaluation: a table ranked by test accuracy, its markdown, summary and chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlpipe import pictures
from tlpipe.files import read_json
from tlpipe.paths import SHIPPED_NAME, evaluation_dir

COLUMNS = [
    "backbone",
    "arch",
    "image_size",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "loss",
    "n_test",
    "params",
    "images_per_second",
]
# How the chart names `backbones.<b>.weights`; any other value is a weights file, named by its file name.
WEIGHTS_NAMES = {None: "random weights", "imagenet": "ImageNet", "noisy-student": "Noisy Student"}
# The two throughputs the chart shows, and how each is drawn: they measure different things.
FROZEN_SPEED = "frozen base: feature extraction"
SHIPPED_SPEED = "shipped model: end to end from files, one at a time"
FROZEN_STYLE = {"color": "tab:blue", "hatch": ""}
SHIPPED_STYLE = {"color": "tab:green", "hatch": "//", "edgecolor": "white"}


def comparison_table(params: dict[str, Any]) -> pd.DataFrame:
    """Every frozen backbone's row, plus the fine-tuned shipped model's row (backbone `model`)."""
    rows = []
    for key, spec in params["backbones"].items():
        scores = read_json(evaluation_dir(key) / "metrics.json")
        rows.append({"backbone": key, "arch": spec["arch"], "image_size": spec["image_size"]} | scores)
    shipped = params["backbones"][params["model"]]
    scores = read_json(evaluation_dir(SHIPPED_NAME) / "metrics.json")
    rows.append(
        scores
        | {"backbone": SHIPPED_NAME, "arch": f"{shipped['arch']} fine-tuned", "image_size": shipped["image_size"]}
    )
    table = pd.DataFrame(rows)
    table = table.sort_values(["accuracy", "roc_auc", "backbone"], ascending=[False, False, True], kind="stable")
    return table[[c for c in COLUMNS if c in table.columns]].reset_index(drop=True)


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """The metric DVC shows for the whole study: the winner, and each row's headline numbers."""
    best = table.iloc[0]
    return {
        "best": best["backbone"],
        "best_accuracy": float(best["accuracy"]),
        "backbones": {
            row["backbone"]: {k: row[k] for k in ("accuracy", "f1", "roc_auc", "loss")}
            for row in table.to_dict("records")
        },
    }


def markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in ("accuracy", "precision", "recall", "f1", "roc_auc", "loss"):
        shown[column] = shown[column].map("{:.4f}".format)
    shown["params"] = (shown["params"] / 1e6).map("{:.1f} M".format)
    shown["images_per_second"] = shown["images_per_second"].map("{:.1f}".format)
    return (
        "# Backbone comparison\n\nTest split, ranked by accuracy. `model` is the shipped, fine-tuned model. "
        "`images_per_second` is the frozen base's feature extraction throughput on this machine "
        "(for `model`: end to end from image files, one at a time).\n\n"
        + shown.to_markdown(index=False, disable_numparse=True)
        + "\n"
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


def chart_figure(table: pd.DataFrame, params: dict[str, Any] | None) -> Any:
    rows = table.iloc[::-1].reset_index(drop=True)  # barh draws bottom up: the best row goes on top
    shipped = (rows["backbone"] == SHIPPED_NAME).to_numpy()
    y = np.arange(len(rows))
    fig, (acc_ax, speed_ax) = pictures.pyplot().subplots(
        1, 2, figsize=(13, 0.5 * len(rows) + 2.6), sharey=True, layout="constrained"
    )
    for part, style, speed in ((~shipped, FROZEN_STYLE, FROZEN_SPEED), (shipped, SHIPPED_STYLE, SHIPPED_SPEED)):
        if part.any():
            acc_ax.barh(y[part], rows["accuracy"][part], **style)
            speed_ax.barh(y[part], rows["images_per_second"][part], label=speed, **style)
    acc_ax.set_yticks(y, row_labels(rows, params))
    low = max(0.0, float(rows["accuracy"].min()) - 0.05)
    acc_ax.set_xlim(low, 1.0 + 0.1 * (1.0 - low))  # room for the value printed after a bar at 1.0
    acc_ax.set_xlabel("test accuracy")
    for row, value in zip(y, rows["accuracy"]):
        acc_ax.text(value, row, f" {value:.3f}", va="center", fontsize=9)
    speed_ax.set_xlabel("images/s (what is timed: see legend)")
    speed_ax.set_xlim(0, float(rows["images_per_second"].max()) * 1.15)
    for row, value in zip(y, rows["images_per_second"]):
        speed_ax.text(value, row, f" {value:.0f}", va="center", fontsize=9)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    pictures.figure_title(fig, chart_title(params))
    return fig
