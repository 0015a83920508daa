"""PNG pictures every run leaves behind: they open without a browser or internet (DVC's HTML plots load
their scripts from a CDN). Training curves, confusion matrix, ROC curve, and the test images a model got wrong."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.common import atomic_path

MAX_ERRORS_SHOWN = 24


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 90) -> None:
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def training_curves(history: dict[str, list[float]], title: str, path: Path) -> None:
    """Loss and accuracy per epoch, training and validation."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric, [])
            ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    plt = pyplot()
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set_title(title)
    save_png(fig, path)


def roc_curves(records: list[dict[str, Any]], title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for name in dict.fromkeys(r["class"] for r in records):
        points = [r for r in records if r["class"] == name]
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=name)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(title="positive class", fontsize=8)
    ax.set_title(title)
    save_png(fig, path)


def misclassified_grid(errors: list[dict[str, Any]], title: str, path: Path) -> None:
    """Up to MAX_ERRORS_SHOWN wrongly classified images with their true and predicted classes."""
    from PIL import Image

    plt = pyplot()
    shown = errors[:MAX_ERRORS_SHOWN]
    columns = 6
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, shown):
        with Image.open(error["path"]) as image:
            image.thumbnail((160, 160))
            ax.imshow(image.convert("RGB"))
        ax.set_title(f"true {error['actual']}\npred {error['predicted']} ({error['probability']:.2f})", fontsize=8)
    fig.suptitle(f"{title}: {len(errors)} wrong" + (f", first {len(shown)} shown" if len(errors) > len(shown) else ""))
    if not errors:
        axes.flat[0].text(0.5, 0.5, "no test image misclassified", ha="center", va="center")
    save_png(fig, path)
