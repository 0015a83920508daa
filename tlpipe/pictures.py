"""PNG pictures every run leaves behind: they open without a browser or internet (DVC's HTML plots load
their scripts from a CDN). Training curves, confusion matrix, ROC curve, and the test images a model got wrong.

Class names go through `class_names`, so names in any script draw with an installed font that has their
glyphs, or as visible \\uXXXX escapes, never as empty boxes.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.files import atomic_path

MAX_ERRORS_SHOWN = 24
MAX_ANNOTATED_CLASSES = 30  # beyond, the confusion picture shows the worst classes and confusions instead
MAX_SHOWN_CONFUSIONS = 20  # classes and confusions that picture shows
MAX_LEGEND_CLASSES = 12  # ROC plots with more curves show their mean AUC instead of a legend
# The share of the figure's width a title may take: layouts move axes but never shrink or wrap text.
TITLE_ROOM = 0.94
# Tried first, in this order, for characters the default font (DejaVu Sans) lacks: the usual fonts with
# CJK glyphs on Linux, macOS and Windows. Every other installed font comes after them, by name.
PREFERRED_FALLBACKS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "Noto Sans",
    "PingFang SC",
    "Hiragino Sans",
    "Microsoft YaHei",
    "Arial Unicode MS",
)
# Fonts matplotlib ships that must never stand in for a letter: Last Resort draws a placeholder for whole
# Unicode blocks (two different names would look alike), the others map code points to TeX math symbols.
NOT_FOR_TEXT = ("Last Resort", "cm", "STIXNonUnicode", "STIXSize")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 90) -> None:
    plt = pyplot()
    if fig.get_layout_engine() is None:  # a figure made with a layout engine lays itself out when saved
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


# --- text: class names in any script, titles that fit ----------------------------------------------------


@contextlib.contextmanager
def class_names(names: Iterable[str]) -> Iterator[dict[str, str]]:
    """Build and save pictures inside this block; it yields how to write each class name.

    Inside, matplotlib's font list (font.family, changed only for the block) goes on, character by
    character, to installed fonts that have the glyphs the default font lacks (CJK, Thai, ...). Characters
    no installed font has are written as \\uXXXX escapes, and `$` is escaped so a name never turns into math.
    """
    import matplotlib

    unique = list(dict.fromkeys(names))
    families, missing = glyph_fonts(unique)
    with matplotlib.rc_context({"font.family": [*matplotlib.rcParams["font.family"], *families]}):
        yield {name: drawable(name, missing) for name in unique}


def glyph_fonts(names: Iterable[str]) -> tuple[list[str], set[str]]:
    """Installed font families that draw the characters of `names` the default font lacks, and the
    characters that no installed font has."""
    import matplotlib
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    missing = {char for name in names for char in name if not has_glyph(default, char)}
    families: list[str] = []
    for entry in fallback_candidates():
        if not missing:
            break
        covered = {char for char in missing if has_glyph(entry.fname, char)}
        if covered and entry.name not in families:
            families.append(entry.name)
        missing -= covered
    return families, missing


def fallback_candidates() -> list[Any]:
    """Installed fonts that may draw a missing character: preferred families first, then by name."""
    from matplotlib import font_manager

    def rank(entry: Any) -> tuple[int, str, str]:
        order = PREFERRED_FALLBACKS.index(entry.name) if entry.name in PREFERRED_FALLBACKS else len(PREFERRED_FALLBACKS)
        return order, entry.name, entry.fname

    usable = [entry for entry in font_manager.fontManager.ttflist if not entry.name.startswith(NOT_FOR_TEXT)]
    return sorted(usable, key=rank)


def has_glyph(font_path: str, char: str) -> bool:
    from matplotlib import font_manager

    try:
        return font_manager.get_font(font_path).get_char_index(ord(char)) != 0
    except (OSError, RuntimeError):  # a font file that is unreadable or in a format FreeType rejects
        return False


def drawable(name: str, missing: set[str]) -> str:
    """`name` with each character in `missing` written as a \\uXXXX escape and `$` escaped."""
    return "".join(escape(char) if char in missing else char for char in name).replace("$", r"\$")


def escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def figure_title(fig: Any, title: str) -> Any:
    """`title` above the whole figure, wrapped at spaces until it fits the figure's width."""
    text = fig.suptitle(title)
    renderer = fig.canvas.get_renderer()
    room = TITLE_ROOM * fig.bbox.width
    width = len(title)
    while width > 1 and text.get_window_extent(renderer).width > room:
        width -= 1
        text.set_text(textwrap.fill(title, width, break_on_hyphens=False))
    return text


# --- the pictures ------------------------------------------------------------------------------------------


def training_curves(history: dict[str, list[float]], title: str, path: Path, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, training and validation, and a line at the epoch whose weights were kept.

    `best_epoch` (1-based; 0 = the weights from before the first epoch) defaults to the epoch that
    EarlyStopping(restore_best_weights=True) restores: the first with the lowest val_loss.
    """
    save_png(training_figure(history, title, best_epoch), path)


def training_figure(history: dict[str, list[float]], title: str, best_epoch: int | None = None) -> Any:
    from matplotlib.ticker import MaxNLocator

    best = restored_epoch(history) if best_epoch is None else best_epoch
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.6), layout="tight")
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric, [])
            ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
        if best is not None:
            restored = f"restored weights: epoch {best}" if best >= 1 else "restored weights: before epoch 1"
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, label=restored)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
    figure_title(fig, title)
    return fig


def regularisation_path(cs: list[float], losses: list[float], chosen: float, title: str, path: Path) -> None:
    """The linear probe's cross-validated log loss at each inverse regularisation strength C, and the C chosen."""
    fig, ax = pyplot().subplots(figsize=(7, 3.6), layout="tight")
    if losses:
        ax.plot(cs, losses, marker=".", label="cross-validated log loss")
        ax.axvline(chosen, color="tab:red", linestyle="--", linewidth=1, label=f"chosen: C = {chosen:.3g}")
        ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no class had two images to cross-validate with: C = 1", ha="center", transform=ax.transAxes)
    ax.set_xlabel("C (inverse regularisation strength)")
    ax.set_ylabel("log loss")
    figure_title(fig, title)
    save_png(fig, path)


def restored_epoch(history: dict[str, list[float]]) -> int | None:
    """The 1-based epoch with the lowest val_loss, or None without a finite one."""
    losses = np.asarray(history.get("val_loss", []), dtype=float)
    if not np.isfinite(losses).any():
        return None
    return int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan))) + 1


def confusion_matrix(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """The N x N matrix with a count in every cell up to MAX_ANNOTATED_CLASSES classes; beyond, where such a
    grid can no longer be read, the classes recalled worst and the most frequent confusions."""
    with class_names(classes) as shown:
        labels = [shown[name] for name in classes]
        many = len(classes) > MAX_ANNOTATED_CLASSES
        save_png((confusions_figure if many else confusion_figure)(matrix, labels, title), path)


def confusion_figure(matrix: np.ndarray, labels: list[str], title: str) -> Any:
    """`labels`: the class names as `class_names` writes them; every cell shows its count."""
    size = 2.5 + 0.6 * len(labels)
    fig, ax = pyplot().subplots(figsize=(size, size), layout="tight")
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    figure_title(fig, title)
    return fig


def worst_classes(matrix: np.ndarray, shown: int = MAX_SHOWN_CONFUSIONS) -> list[tuple[int, float, int]]:
    """(class, recall, test images) of the `shown` classes with test images recalled worst: lowest recall first,
    then most images (a class missed 3 times in 3 before one missed once in 1)."""
    support = matrix.sum(axis=1)
    present = np.flatnonzero(support)
    recall = np.diag(matrix)[present] / support[present]
    order = np.lexsort((-support[present], recall))[:shown]
    return [(int(present[i]), float(recall[i]), int(support[present[i]])) for i in order]


def frequent_confusions(matrix: np.ndarray, shown: int = MAX_SHOWN_CONFUSIONS) -> list[tuple[int, int, int]]:
    """(actual, predicted, images) of the `shown` most frequent confusions, most first (ties in class order)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    actual, predicted = np.nonzero(off)
    order = np.lexsort((predicted, actual, -off[actual, predicted]))[:shown]
    return [(int(actual[i]), int(predicted[i]), int(off[actual[i], predicted[i]])) for i in order]


def confusions_figure(matrix: np.ndarray, labels: list[str], title: str) -> Any:
    """For many classes: the worst-recalled classes (recall, test images) beside the most frequent confusions."""
    from matplotlib.ticker import MaxNLocator

    worst, confused = worst_classes(matrix), frequent_confusions(matrix)
    rows = max(len(worst), len(confused), 1)
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(13, 1.2 + 0.32 * rows), layout="constrained")
    y = np.arange(len(worst))[::-1]
    left.barh(y, [recall for _, recall, _ in worst], color="tab:red")
    left.set_yticks(y, [labels[index] for index, _, _ in worst], fontsize=8)
    for row, (_, recall, support) in zip(y, worst):
        left.text(recall, row, f" {recall:.2f} of {support}", va="center", fontsize=8)
    left.set_xlim(0, 1.25)
    left.set_xlabel("recall (share of the class's test images predicted as it)")
    left.set_title(f"{len(worst)} classes recalled worst, of {len(labels)}", fontsize=10)
    y = np.arange(len(confused))[::-1]
    right.barh(y, [count for _, _, count in confused], color="tab:blue")
    right.set_yticks(y, [f"{labels[a]} → {labels[p]}" for a, p, _ in confused], fontsize=8)
    for row, (_, _, count) in zip(y, confused):
        right.text(count, row, f" {count}", va="center", fontsize=8)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("test images (actual → predicted)")
    right.set_title(f"{len(confused)} most frequent confusions", fontsize=10)
    if not confused:
        right.text(0.5, 0.5, "no test image was confused", ha="center", transform=right.transAxes)
    figure_title(fig, title)
    return fig


def roc_curves(records: list[dict[str, Any]], title: str, path: Path) -> None:
    """One curve per positive class of `records` (scoring.roc_records), each with its AUC in the legend."""
    with class_names(r["class"] for r in records) as shown:
        save_png(roc_figure(records, shown, title), path)


def roc_figure(records: list[dict[str, Any]], shown: dict[str, str], title: str) -> Any:
    """`shown`: each class name as `class_names` writes it."""
    fig, ax = pyplot().subplots(figsize=(4.5, 4.2), layout="tight")
    areas = roc_auc(records)
    for name, area in areas.items():
        points = [r for r in records if r["class"] == name]
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=f"{shown[name]} (AUC {area:.4f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if len(areas) > MAX_LEGEND_CLASSES:
        # A legend of a hundred curves hides the plot; the mean says what the curves do together.
        mean = sum(areas.values()) / len(areas)
        ax.text(
            0.98,
            0.02,
            f"{len(areas)} one-vs-rest curves\nmean AUC {mean:.4f}",
            ha="right",
            va="bottom",
            transform=ax.transAxes,
            fontsize=8,
        )
    elif records:
        ax.legend(title="positive class", fontsize=8, loc="lower right")
    figure_title(fig, title)
    return fig


def roc_auc(records: list[dict[str, Any]]) -> dict[str, float]:
    """The area under each class's ROC curve (for two classes, sklearn's roc_auc_score of the one curve)."""
    from sklearn.metrics import auc

    areas = {}
    for name in dict.fromkeys(r["class"] for r in records):
        points = [r for r in records if r["class"] == name]
        areas[name] = float(auc([p["fpr"] for p in points], [p["tpr"] for p in points]))
    return areas


def misclassified_grid(errors: list[dict[str, Any]], title: str, path: Path) -> None:
    """Up to MAX_ERRORS_SHOWN wrongly classified images with their true and predicted classes."""
    shown = errors[:MAX_ERRORS_SHOWN]
    with class_names(error[key] for error in shown for key in ("actual", "predicted")) as names:
        save_png(errors_figure(errors, names, title), path)


def errors_figure(errors: list[dict[str, Any]], names: dict[str, str], title: str) -> Any:
    shown = errors[:MAX_ERRORS_SHOWN]
    cells = [
        (e["path"], f"true {names[e['actual']]}\npred {names[e['predicted']]} ({e['probability']:.2f})") for e in shown
    ]
    more = f", first {len(shown)} shown" if len(errors) > len(shown) else ""
    return grid_figure(cells, f"{title}: {len(errors)} wrong{more}", "no test image misclassified")


def image_grid(
    paths: list[str],
    caption: Callable[[int, dict[str, str]], str],
    names: Iterable[str],
    title: str,
    empty: str,
    path: Path,
    columns: int = 6,
) -> None:
    """The images at `paths`, each captioned by caption(position, drawable class names); `names` are the
    class names the captions use (see class_names)."""
    with class_names(names) as drawn:
        cells = [(image, caption(index, drawn)) for index, image in enumerate(paths)]
        save_png(grid_figure(cells, title, empty, columns), path)


def grid_figure(cells: list[tuple[str, str]], title: str, empty: str, columns: int = 6) -> Any:
    """(image path, caption) cells in rows of `columns`, thumbnails of at most 160 pixels a side."""
    from PIL import Image

    rows = max(1, -(-len(cells) // columns))
    fig, axes = pyplot().subplots(
        rows, columns, figsize=(2.0 * columns, 2.3 * rows + 0.4), squeeze=False, layout="tight"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, caption) in zip(axes.flat, cells):
        with Image.open(image_path) as image:
            image.thumbnail((160, 160))
            ax.imshow(image.convert("RGB"))
        ax.set_title(caption, fontsize=8)
    figure_title(fig, title)
    if not cells:
        axes.flat[0].text(0.5, 0.5, empty, ha="center", va="center")
    return fig


def reliability_diagram(
    before: list[dict[str, float]], after: list[dict[str, float]], eces: tuple[float, float], title: str, path: Path
) -> None:
    """Accuracy against confidence per bin (statistics.reliability_bins), before and after temperature scaling."""
    save_png(reliability_figure(before, after, eces, title), path)


def reliability_figure(
    before: list[dict[str, float]], after: list[dict[str, float]], eces: tuple[float, float], title: str
) -> Any:
    fig, ax = pyplot().subplots(figsize=(4.5, 4.2), layout="tight")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    for points, name, ece, marker in (
        (before, "as trained", eces[0], "o"),
        (after, "temperature-scaled", eces[1], "s"),
    ):
        ax.plot(
            [p["confidence"] for p in points],
            [p["accuracy"] for p in points],
            marker=marker,
            label=f"{name} (ECE {ece:.4f})",
        )
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    figure_title(fig, title)
    return fig
