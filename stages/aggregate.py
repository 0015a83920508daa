"""Stage aggregate: one table of every backbone, ranked by test accuracy.

Writes metrics/summary.json, reports/comparison.{md,csv} and the chart reports/comparison.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from stages import pictures
from stages.common import EVALUATION_DIR, METRICS_DIR, atomic_path, read_json, stage_main, write_json, write_text
from stages.params import load_params

REPORTS_DIR = Path("reports")
COLUMNS = ["backbone", "arch", "image_size", "accuracy", "precision", "recall", "f1", "roc_auc", "loss",
           "n_test", "params", "images_per_second"]


def comparison_table(params: dict[str, Any]) -> pd.DataFrame:
    """Every frozen backbone's row, plus the fine-tuned shipped model's row (backbone `model`)."""
    rows = []
    for key, spec in params["backbones"].items():
        scores = read_json(EVALUATION_DIR / key / "metrics.json")
        rows.append({"backbone": key, "arch": spec["arch"], "image_size": spec["image_size"]} | scores)
    shipped = params["backbones"][params["model"]]
    scores = read_json(EVALUATION_DIR / "model" / "metrics.json")
    rows.append(
        scores | {"backbone": "model", "arch": f"{shipped['arch']} fine-tuned", "image_size": shipped["image_size"]}
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


def chart(table: pd.DataFrame, path: Path) -> None:
    fig, (acc_ax, speed_ax) = pictures.pyplot().subplots(1, 2, figsize=(11, 0.6 * len(table) + 1.8))
    names = table["backbone"][::-1]
    acc_ax.barh(names, table["accuracy"][::-1], color="tab:blue")
    acc_ax.set_xlim(max(0.0, float(table["accuracy"].min()) - 0.05), 1.0)
    acc_ax.set_xlabel("test accuracy")
    for y, value in enumerate(table["accuracy"][::-1]):
        acc_ax.text(value, y, f" {value:.3f}", va="center", fontsize=9)
    speed_ax.barh(names, table["images_per_second"][::-1], color="tab:orange")
    speed_ax.set_xlabel("feature extraction, images/s")
    fig.suptitle("Frozen ImageNet backbones, ranked by test accuracy")
    pictures.save_png(fig, path, dpi=100)


@stage_main
def main() -> None:
    params = load_params()
    table = comparison_table(params)
    with atomic_path(REPORTS_DIR / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(REPORTS_DIR / "comparison.md", markdown(table))
    chart(table, REPORTS_DIR / "comparison.png")
    write_json(METRICS_DIR / "summary.json", summary(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
