"""The PNG pictures say what they show: row labels, titles that fit, AUCs, the restored epoch, any script."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib import font_manager
from PIL import Image
from sklearn.metrics import roc_auc_score

from tlpipe import comparison, pictures
from tlpipe.scoring import roc_records

SHIPPED_TITLE = "shipped model (efficientnet_b0 fine-tuned)"


def texts(items) -> list[str]:
    return [item.get_text() for item in items]


# --- the comparison chart -------------------------------------------------------------------------------


def study(weights: dict[str, str | None]) -> tuple[pd.DataFrame, dict]:
    """The comparison table and params of backbones a (VGG16), b (ResNet50), c (MobileNetV2, shipped)."""
    archs = {"a": "VGG16", "b": "ResNet50", "c": "MobileNetV2"}
    backbones = {key: {"arch": archs[key], "image_size": 32, "weights": w} for key, w in weights.items()}
    params = {"model": "c", "backbones": backbones}
    rows = [
        {
            "backbone": key,
            "arch": arch,
            "image_size": 32,
            "accuracy": accuracy,
            "accuracy_ci_low": accuracy - 0.03,
            "accuracy_ci_high": min(1.0, accuracy + 0.03),
            "difference_to_best": round(accuracy - 0.97, 6),
            "difference_ci_low": round(accuracy - 0.99, 6),
            "difference_ci_high": round(accuracy - 0.95, 6),
            "p_value": 1.0 if key == "b" else 0.3,
            "verdict": "best" if key == "b" else "tied with best",
            "cv_accuracy_mean": None if key == "model" else 0.95,
            "cv_accuracy_std": None if key == "model" else 0.01,
            "precision": 0.9,
            "recall": 0.9,
            "f1": 0.9,
            "roc_auc": 0.95,
            "loss": 0.2,
            "ece": 0.03,
            "ece_calibrated": 0.02,
            "n_test": 100,
            "params": 1e6,
            "images_per_second": speed,
        }
        for key, arch, accuracy, speed in [
            ("b", "ResNet50", 0.97, 60.0),
            ("model", "MobileNetV2 fine-tuned", 0.96, 90.0),
            ("c", "MobileNetV2", 0.95, 280.0),
            ("a", "VGG16", 0.90, 30.0),
        ]
    ]
    return pd.DataFrame(rows).reindex(columns=comparison.COLUMNS), params  # no deployment cost: NaN


def test_chart_rows_say_which_weights_and_which_model_is_shipped() -> None:
    table, params = study({"a": "imagenet", "b": None, "c": "weights/my base.weights.h5"})
    fig = comparison.chart_figure(table, params)
    acc_ax = fig.axes[0]
    # barh draws bottom up: the best row is the last tick.
    assert texts(acc_ax.get_yticklabels())[::-1] == [
        "b (ResNet50, random weights, frozen)",
        "model = c fine-tuned (shipped)",
        "c (MobileNetV2, weights: my base.weights.h5, frozen)",
        "a (VGG16, ImageNet, frozen)",
    ]
    assert "ImageNet" not in fig.get_suptitle() and "fine-tuned shipped model" in fig.get_suptitle()
    pictures.pyplot().close(fig)

    fig = comparison.chart_figure(*study({"a": "imagenet", "b": "imagenet", "c": "imagenet"}))
    assert fig.get_suptitle().startswith("Frozen ImageNet backbones")
    pictures.pyplot().close(fig)


def test_chart_tells_the_shipped_models_throughput_apart() -> None:
    fig = comparison.chart_figure(*study({"a": "imagenet", "b": "imagenet", "c": "imagenet"}))
    speed_ax = fig.axes[1]
    bars = {round(bar.get_width()): bar for bar in speed_ax.patches}
    shipped, frozen = bars[90], [bars[60], bars[280], bars[30]]
    assert shipped.get_hatch() == "//" and all(not bar.get_hatch() for bar in frozen)
    assert all(shipped.get_facecolor() != bar.get_facecolor() for bar in frozen)
    assert texts(fig.legends[0].get_texts()) == [comparison.FROZEN_SPEED, comparison.SHIPPED_SPEED]
    assert "feature extraction" not in speed_ax.get_xlabel()
    pictures.pyplot().close(fig)


def test_chart_writes_a_png_with_and_without_params(tmp_path: Path) -> None:
    table, params = study({"a": "imagenet", "b": None, "c": "imagenet"})
    comparison.chart(table, tmp_path / "with.png", params)
    comparison.chart(table, tmp_path / "without.png")  # the former call, without params
    for name in ("with.png", "without.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 1000
    assert comparison.row_labels(table, None)[:2] == [
        "b (ResNet50, frozen)",
        "model = MobileNetV2 fine-tuned (shipped)",
    ]


# --- titles ---------------------------------------------------------------------------------------------


def assert_title_inside(fig) -> None:
    fig.canvas.draw()
    (title,) = [text for text in fig.texts if text.get_text()]
    box, frame = title.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
    for ax in fig.axes:
        assert box.y0 >= ax.get_window_extent().y1, "the title overlaps a plot"


@pytest.mark.parametrize(
    ("n_classes", "title"),
    [(2, SHIPPED_TITLE), (2, SHIPPED_TITLE + " on holiday photos, seed 42"), (12, SHIPPED_TITLE * 3)],
)
def test_confusion_matrix_title_fits_the_figure(n_classes: int, title: str) -> None:
    classes = [f"class {i}" for i in range(n_classes)]
    fig = pictures.confusion_figure(np.eye(n_classes, dtype=int) * 5, classes, title)
    assert_title_inside(fig)
    assert fig.get_suptitle().split() == title.split()  # wrapped at spaces, nothing dropped
    pictures.pyplot().close(fig)


def test_other_titles_fit_their_figures() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    records = roc_records(y, np.stack([1 - y * 0.7, y * 0.7], axis=1), ["cats", "dogs"])
    long_title = SHIPPED_TITLE + " on a test split with a very long name indeed"
    for fig in (
        pictures.roc_figure(records, {"dogs": "dogs"}, long_title),
        pictures.training_figure({"loss": [1.0, 0.5], "val_loss": [1.0, 0.7]}, long_title * 2),
    ):
        assert_title_inside(fig)
        pictures.pyplot().close(fig)


# --- ROC ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [["cats", "dogs"], ["ants", "bees", "cows"]])
def test_roc_legend_shows_each_curves_auc(classes: list[str]) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, len(classes), 300)
    probabilities = rng.dirichlet(np.ones(len(classes)), 300)
    probabilities[np.arange(300), y] += rng.random(300)  # informative, not perfect
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    records = roc_records(y, probabilities, classes)

    areas = pictures.roc_auc(records)
    positives = classes[1:] if len(classes) == 2 else classes  # one curve for two classes: the second one's
    assert list(areas) == positives
    for name in positives:
        index = classes.index(name)
        expected = roc_auc_score(y == index, probabilities[:, index])
        assert 0.6 < expected < 0.99
        assert areas[name] == pytest.approx(expected, abs=1e-5)
    if len(classes) == 2:
        assert areas["dogs"] == pytest.approx(roc_auc_score(y, probabilities[:, 1]), abs=1e-5)

    fig = pictures.roc_figure(records, {name: name for name in classes}, "t")
    assert texts(fig.axes[0].get_legend().get_texts()) == [f"{name} (AUC {areas[name]:.4f})" for name in positives]
    pictures.pyplot().close(fig)


# --- training curves --------------------------------------------------------------------------------------

HISTORY = {
    "loss": [0.9, 0.6, 0.5, 0.45, 0.44],
    "val_loss": [0.8, 0.5, 0.55, 0.5, 0.6],  # lowest at epoch 2; epoch 4 ties it but does not improve on it
    "accuracy": [0.5, 0.7, 0.75, 0.8, 0.8],
    "val_accuracy": [0.55, 0.72, 0.7, 0.73, 0.71],
}


def restored_lines(fig) -> list[tuple[list[float], str]]:
    return [
        (list(line.get_xdata()), line.get_label())
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_label().startswith("restored")
    ]


@pytest.mark.parametrize(("best_epoch", "expected"), [(None, 2), (4, 4), (0, 0)])
def test_training_curves_mark_the_restored_epoch(best_epoch: int | None, expected: int) -> None:
    fig = pictures.training_figure(HISTORY, "t", best_epoch=best_epoch)
    lines = restored_lines(fig)
    assert [xs for xs, _ in lines] == [[expected, expected]] * 2  # on the loss and the accuracy plot
    wording = f"epoch {expected}" if expected else "before epoch 1"
    assert all(label == f"restored weights: {wording}" for _, label in lines)
    for ax in fig.axes:
        assert lines[0][1] in texts(ax.get_legend().get_texts())
    pictures.pyplot().close(fig)


def test_training_curves_use_integer_epoch_ticks_and_keep_the_old_call(tmp_path: Path) -> None:
    history = {key: values[:3] for key, values in HISTORY.items()}  # 3 epochs: matplotlib alone ticks 1.25, 1.5...
    fig = pictures.training_figure(history, "t")
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    pictures.pyplot().close(fig)

    pictures.training_curves(history, "t", tmp_path / "curves.png")  # how train.py and finetune.py call it
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert restored_lines(pictures.training_figure({"loss": [1.0]}, "no validation")) == []


# --- class names in any script -------------------------------------------------------------------------


def covering_fonts(families: list[str]) -> list[str]:
    """The font file matplotlib draws each family of a font.family list with."""
    return [font_manager.findfont(font_manager.FontProperties(family=[family])) for family in families]


def has_glyph(path: str, char: str) -> bool:
    return font_manager.get_font(path).get_char_index(ord(char)) != 0


@pytest.mark.parametrize("name", ["猫", "ネコ", "ℊ", "Ωmega", "𓃠", "gâteau"])
def test_class_names_draw_with_a_font_that_has_the_glyphs_or_escaped(name: str) -> None:
    before = list(matplotlib.rcParams["font.family"])
    with pictures.class_names([name, "cats"]) as shown:
        fonts = covering_fonts(matplotlib.rcParams["font.family"])
        assert shown["cats"] == "cats"
        escaped = "".join(char if any(has_glyph(f, char) for f in fonts) else pictures.escape(char) for char in name)
        assert shown[name] == escaped
        for char in shown[name]:  # whatever is drawn, some font in the list has it: no empty boxes
            assert any(has_glyph(font, char) for font in fonts), (name, char)
    assert matplotlib.rcParams["font.family"] == before  # the font list changed only inside the block


def test_escapes_and_dollars() -> None:
    assert pictures.drawable("猫 cat", {"猫"}) == "\\u732b cat"
    assert pictures.drawable("𓃠", {"𓃠"}) == "\\U000130e0"
    assert pictures.drawable("$5 $10", set()) == r"\$5 \$10"  # a name, not mathtext


def no_missing_glyph_warnings(draw) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw()
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []


def test_pictures_with_cjk_class_names_draw_no_empty_boxes(tmp_path: Path) -> None:
    classes = ["猫", "犬", "ℊ"]
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probabilities = np.eye(3)[[0, 1, 2, 1, 1, 2, 0, 0]] * 0.8 + 0.2 / 3
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8), "red").save(image)
    errors = [{"path": image, "actual": "猫", "predicted": "犬", "probability": 0.9}]

    no_missing_glyph_warnings(lambda: pictures.confusion_matrix(np.eye(3, dtype=int), classes, "t", tmp_path / "c.png"))
    records = roc_records(y, probabilities, classes)
    no_missing_glyph_warnings(lambda: pictures.roc_curves(records, "t", tmp_path / "r.png"))
    no_missing_glyph_warnings(lambda: pictures.misclassified_grid(errors, "t", tmp_path / "e.png"))
    for name in ("c.png", "r.png", "e.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_many_classes_draw_the_worst_classes_and_the_most_frequent_confusions(tmp_path) -> None:
    """Beyond MAX_ANNOTATED_CLASSES, an N x N grid cannot be read: the picture ranks classes and confusions."""
    from tlpipe import pictures

    n = pictures.MAX_ANNOTATED_CLASSES + 10
    matrix = np.eye(n, dtype=int) * 4
    matrix[3, 3], matrix[3, 7] = 0, 4  # class 3: recall 0 of 4, all taken for 7
    matrix[5, 5], matrix[5, 6] = 1, 3  # class 5: recall 0.25
    matrix[9, 9], matrix[9, 2] = 0, 1  # class 9: recall 0, one image
    worst = pictures.worst_classes(matrix)
    assert worst[:3] == [(3, 0.0, 4), (9, 0.0, 1), (5, 0.25, 4)]
    assert len(worst) == pictures.MAX_SHOWN_CONFUSIONS
    assert pictures.frequent_confusions(matrix) == [(3, 7, 4), (5, 6, 3), (9, 2, 1)]
    labels = [f"c{i:03d}" for i in range(n)]
    fig = pictures.confusions_figure(matrix, labels, "many classes")
    left, right = fig.axes
    # Tick labels in the order drawn, top down: the worst class and the most frequent confusion on top.
    assert [tick.get_text() for tick in left.get_yticklabels()][:3] == ["c003", "c009", "c005"]
    assert [tick.get_text() for tick in right.get_yticklabels()] == ["c003 → c007", "c005 → c006", "c009 → c002"]
    assert left.get_yticks()[0] == len(worst) - 1 and right.get_yticks()[0] == 2
    pictures.pyplot().close(fig)
    pictures.confusion_matrix(matrix, labels, "many classes", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    few = pictures.confusion_figure(np.eye(3, dtype=int), labels[:3], "three")
    assert len(few.axes[0].texts) == 9


def test_a_roc_plot_of_many_classes_shows_their_mean_auc_instead_of_a_legend() -> None:
    from tlpipe import pictures

    records = [
        {"class": f"c{i}", "fpr": fpr, "tpr": tpr, "threshold": 0.5}
        for i in range(20)
        for fpr, tpr in ((0.0, 0.0), (0.0, 0.5 + i / 40), (1.0, 1.0))
    ]
    fig = pictures.roc_figure(records, {f"c{i}": f"c{i}" for i in range(20)}, "many")
    ax = fig.axes[0]
    assert ax.get_legend() is None
    expected = np.mean([0.5 + i / 40 for i in range(20)]) / 2 + 0.5
    assert [t.get_text() for t in ax.texts] == [f"20 one-vs-rest curves\nmean AUC {expected:.4f}"]
