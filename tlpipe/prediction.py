"""Classifying image files with a shipped model: what `tl-predict` and the evaluate_model stage both run.

The model is a .keras file with labels.json (its class names) beside it. Images are checked and decoded as
in training, and probabilities are kept at full precision: the output formats round them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.errors import PipelineError
from tlpipe.files import read_json
from tlpipe.images import ImageRejected, is_tf_ready, open_image, to_rgb
from tlpipe.models import inference_function, load_model, worth_freezing
from tlpipe.paths import SHIPPED_MODEL
from tlpipe.progress import bar
from tlpipe.scoring import class_probabilities
from tlpipe.statistics import apply_temperature

# The parent of the `tlpipe` package: where the pipeline writes models/model.keras.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    """One image's result; probabilities at the model's full precision (rounded only when written out)."""

    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None


def default_model(cwd: Path, project_root: Path = PROJECT_ROOT) -> Path:
    """models/model.keras in `cwd` if it is there, else the one in the project that holds this code."""
    local = cwd / SHIPPED_MODEL
    return SHIPPED_MODEL if local.exists() else project_root / SHIPPED_MODEL


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (hidden ones skipped), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return found


def check_model_file(path: Path, remedy: str) -> None:
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a model file; pass the .keras file inside it")
    if not path.is_file():
        raise PipelineError(f"{path} not found; {remedy}")


def read_labels(model_path: Path) -> list[str]:
    """The class names in labels.json beside the model, in the order of the model's outputs."""
    path = model_path.parent / "labels.json"
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: the class names of {model_path.name} must be beside it; "
            "copy the labels.json that came with the model there, or run dvc repro"
        )
    data = read_json(path)
    classes = data.get("classes") if isinstance(data, dict) else None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise PipelineError(f"{path} has no `classes` list of class names; rerun dvc repro to rewrite it")
    return classes


def read_temperature(model_path: Path) -> float:
    """The temperature predict applies (read_calibration)."""
    return read_calibration(model_path)["temperature"]


def read_calibration(model_path: Path) -> dict[str, float]:
    """`temperature` (applied), `temperature_fitted` and `temperature_p_value` from labels.json beside the
    model (statistics.calibration); a model shipped before calibration existed has none: temperature 1."""
    path = model_path.parent / "labels.json"
    data = read_json(path)
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise PipelineError(f"{path}: temperature must be a number above 0, got {temperature!r}; rerun dvc repro")
    return {
        "temperature": float(temperature),
        "temperature_fitted": float(data.get("temperature_fitted", temperature)),
        "temperature_p_value": float(data.get("temperature_p_value", 1.0)),
    }


def check_outputs(model: Any, labels: list[str], model_path: Path) -> None:
    expected = 1 if len(labels) == 2 else len(labels)  # two classes: one sigmoid output
    outputs = model.output_shape[-1]
    if outputs != expected:
        raise PipelineError(
            f"cannot use {model_path}: it has {outputs} outputs but labels.json names {len(labels)} classes; "
            "use the labels.json that came with the model"
        )


def load_classifier(model_path: Path, remedy: str = "run dvc repro to build it") -> tuple[Any, list[str]]:
    """The model and its class names (labels.json beside it); `remedy` says what to do when it is missing."""
    check_model_file(model_path, remedy)
    labels = read_labels(model_path)
    model = load_model(model_path)
    check_outputs(model, labels, model_path)
    return model, labels


def classifier_function(model: Any, n_images: int) -> Callable[[np.ndarray], np.ndarray]:
    """One image (H, W, 3) -> class probabilities, compiled once for any image size (and with the weights
    as constants where `n_images` pay for it: models.worth_freezing)."""
    import tensorflow as tf

    forward = inference_function(
        lambda image: model(image[tf.newaxis], training=False), (None, None, 3), worth_freezing(n_images)
    )
    return lambda image: class_probabilities(forward(image).numpy())[0]


def read_pixels(path: Path) -> np.ndarray:
    """Checked, upright 8-bit RGB pixels as float32.

    Files TensorFlow reads as they are go through the same decoder as training (tf.io.decode_image), so
    served pixels equal trained pixels; the rest (EXIF-rotated, CMYK, 16-bit, ...) are converted by Pillow.
    """
    image, info = open_image(path)
    try:
        if is_tf_ready(info):
            import tensorflow as tf

            # As bytes: a file name that is not UTF-8 cannot become a TensorFlow string otherwise.
            contents = tf.io.read_file(os.fsencode(path))
            decoded = tf.io.decode_image(contents, channels=3, expand_animations=False)
            return decoded.numpy().astype(np.float32)
        return np.asarray(to_rgb(image), dtype=np.float32)
    except ImageRejected:
        raise
    except Exception as error:  # a file Pillow accepted but TensorFlow or the RGB conversion did not
        raise ImageRejected(
            path, f"does not decode ({str(error).splitlines()[0] if str(error) else error!r})"
        ) from None
    finally:
        image.close()


def predict_files(
    model: Any, labels: list[str], files: Iterable[Path], temperature: float = 1.0
) -> Iterator[Prediction]:
    """One Prediction per file, in order; probabilities temperature-scaled (statistics.apply_temperature)."""
    files = list(files)
    classify = classifier_function(model, len(files))
    for path in files:
        try:
            pixels = read_pixels(path)
        except PipelineError as error:
            yield Prediction(str(path), error=getattr(error, "reason", str(error)))
            continue
        except OSError as error:
            yield Prediction(str(path), error=f"cannot read ({error.strerror or error})")
            continue
        # Unrounded: scores need rows that sum to 1, which rounding each of many small probabilities breaks.
        raw = classify(pixels)
        scaled = raw if temperature == 1.0 else apply_temperature(raw[np.newaxis], temperature)[0]
        probabilities = [float(p) for p in scaled]
        best = int(np.argmax(probabilities))
        yield Prediction(str(path), labels[best], probabilities[best], probabilities)


def class_difference(labels: list[str], classes: list[str]) -> str:
    """How the model's classes differ from the data's, short enough for one line with hundreds of classes."""
    if len(labels) != len(classes):
        return f"was trained on {len(labels)} classes, the data has {len(classes)}"
    index = next(i for i, (label, name) in enumerate(zip(labels, classes)) if label != name)
    return f"was trained on other classes: its class {index} is {labels[index]!r}, the data's is {classes[index]!r}"


def predict_with_progress(model: Any, labels: list[str], paths: list[Path]) -> list[Prediction]:
    """predict_files over `paths`, with a progress bar: a large backbone on a CPU takes minutes."""
    predictions = []
    with bar(len(paths), "evaluate_model", "img") as progress:
        for prediction in predict_files(model, labels, paths):
            predictions.append(prediction)
            progress.update()
    return predictions
