"""Exporting the shipped model for runtimes that do not run Keras, and checking each export against it.

Every format takes what models/model.keras takes, a float32 batch of raw RGB pixels (0..255) of any size,
and returns what it returns: uncalibrated class probabilities (one sigmoid column for two classes). The
conversions are Keras' own SavedModel export, TensorFlow's TFLite converter and tf2onnx; each format is then
run by its own runtime (TensorFlow, LiteRT, ONNX Runtime).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.datasets import AUGMENTATION_LAYER
from tlpipe.errors import first_line
from tlpipe.inference import LITERT, ONNX_RUNTIME, TENSORFLOW, one_image, runtime_outputs
from tlpipe.models import quiet_converters, write_onnx

# One image (H, W, 3), float32 RGB in 0..255 -> its class probabilities (n_classes,).
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    title: str
    path: str  # inside the exports folder
    runtime: str
    quantized: bool = False
    # TFLite post-training quantization: dynamic-range int8 weights, or float16 weights.
    tflite_weights: str | None = None


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in [
        ExportFormat("saved_model", "SavedModel", "saved_model", TENSORFLOW),
        ExportFormat("tflite", "TFLite float32", "model.tflite", LITERT),
        ExportFormat(
            "tflite_int8", "TFLite, int8 weights", "model_int8.tflite", LITERT, quantized=True, tflite_weights="int8"
        ),
        ExportFormat(
            "tflite_float16",
            "TFLite, float16 weights",
            "model_float16.tflite",
            LITERT,
            quantized=True,
            tflite_weights="float16",
        ),
        ExportFormat("onnx", "ONNX", "model.onnx", ONNX_RUNTIME),
    ]
}

# What an export must do to be kept: a float format agrees with the .keras model on almost every image and
# to a thousandth of a probability; a quantized one loses at most a point of accuracy.
FLOAT_MIN_AGREEMENT = 0.999
FLOAT_MAX_PROBABILITY_DIFFERENCE = 1e-3
QUANTIZED_MAX_ACCURACY_LOSS = 0.01
# The key of the shipped .keras model's own row in metrics/export.json, beside the formats'.
KERAS = "keras"


def serving_model(model: Any) -> Any:
    """The shipped model without its training-time augmentation, every layer fixed in inference mode.

    The augmentation is identity at inference, but its random ops stay in a traced graph, and neither TFLite
    nor ONNX has kernels for them; nor for dropout's, unless `training=False` is fixed at each call.
    """
    import keras

    inputs = keras.Input(model.input_shape[1:], name="image")
    x = inputs
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name == AUGMENTATION_LAYER:
            continue
        x = layer(x, training=False)
    return keras.Model(inputs, x, name=f"{model.name}_serving")


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (a SavedModel)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def failure_reason(error: BaseException) -> str:
    """One line for a failed conversion: the ops a converter lacks when it names them, else the first line."""
    text = str(error)
    for pattern in (r"TF Select ops: ([^\n]+)", r"Unsupported ops: ([^\n]+)", r"No Op registered for (\w+)"):
        if found := re.search(pattern, text):
            return f"ops the runtime lacks: {found.group(1).strip()}"
    return first_line(error)[:300]


def convert_tflite(saved_model: Path, weights: str | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if weights is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if weights == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def convert_onnx(serving: Any, path: Path) -> None:
    """tf2onnx over the model's frozen graph (tlpipe.models.write_onnx), input `image` and output
    `probabilities`, for images of any size."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, None, None, 3), tf.float32, name="image")
    write_onnx(lambda image: serving(image, training=False), spec, path, "image", "probabilities")


def export_formats(
    model: Any, names: list[str], folder: Path, log: Callable[[str], None] = lambda line: None
) -> dict[str, str]:
    """Write each format in `names` under `folder`; {name: one-line reason} for those that failed. `log` gets
    a line as each conversion ends (a deep backbone takes minutes).

    One SavedModel serves every TFLite conversion (TensorFlow's converter reads one), so asking for TFLite
    without `saved_model` writes it to a scratch folder. A failed format never stops the others.
    """
    serving = serving_model(model)
    failed: dict[str, str] = {}
    wants_tflite = any(FORMATS[name].runtime == LITERT for name in names)
    scratch = Path(tempfile.mkdtemp(prefix="saved_model-", dir=folder))
    saved_model = folder / FORMATS["saved_model"].path if "saved_model" in names else scratch / "saved_model"
    try:
        if "saved_model" in names or wants_tflite:
            started = time.perf_counter()
            try:
                with quiet_converters():
                    serving.export(str(saved_model), format="tf_saved_model", verbose=False)
                log(f"saved_model converted in {time.perf_counter() - started:.1f} s")
            except Exception as error:  # noqa: BLE001 - any converter error is reported, not raised
                reason = failure_reason(error)
                failed |= {name: reason for name in names if name == "saved_model" or FORMATS[name].runtime == LITERT}
        for name in names:
            spec, target = FORMATS[name], folder / FORMATS[name].path
            if name in failed or name == "saved_model":
                continue
            started = time.perf_counter()
            try:
                with quiet_converters():
                    if spec.runtime == LITERT:
                        target.write_bytes(convert_tflite(saved_model, spec.tflite_weights))
                    else:
                        convert_onnx(serving, target)
                        check_onnx(target)
                log(f"{name} converted in {time.perf_counter() - started:.1f} s")
            except Exception as error:  # noqa: BLE001
                target.unlink(missing_ok=True)
                failed[name] = failure_reason(error)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return failed


def check_onnx(path: Path) -> None:
    """tf2onnx writes a graph even when it cannot convert an op, leaving the op in it as it was; ONNX Runtime
    refuses such a graph when it loads it (naming the op), so loading it is the check."""
    import onnxruntime

    onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def load_runner(name: str, path: Path) -> Runner:
    """The artifact loaded in its own runtime, as a function of one image."""
    from tlpipe.scoring import class_probabilities

    outputs, _ = runtime_outputs(FORMATS[name].runtime, path)
    return one_image(lambda images: class_probabilities(outputs(images)))


def parity(reference: np.ndarray, probabilities: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """accuracy, agreement (share of images where the top class equals the reference's) and the largest
    absolute difference of any class probability from the reference's."""
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": round(float((predicted == y_true).mean()), 6),
        "agreement": round(float((predicted == reference.argmax(axis=1)).mean()), 6),
        "max_probability_difference": float(f"{np.abs(probabilities - reference).max():.3g}"),
    }


def parity_problem(name: str, scores: dict[str, float], keras_accuracy: float) -> str | None:
    """Why an export misses its bar (module constants), or None."""
    if FORMATS[name].quantized:
        loss = keras_accuracy - scores["accuracy"]
        if loss > QUANTIZED_MAX_ACCURACY_LOSS + 1e-12:
            return f"loses {loss:.4f} accuracy against .keras (at most {QUANTIZED_MAX_ACCURACY_LOSS} allowed)"
        return None
    if scores["agreement"] < FLOAT_MIN_AGREEMENT:
        return f"agrees with .keras on {scores['agreement']:.4f} of test images (at least {FLOAT_MIN_AGREEMENT})"
    if scores["max_probability_difference"] > FLOAT_MAX_PROBABILITY_DIFFERENCE:
        return (
            f"differs from .keras by up to {scores['max_probability_difference']:.3g} in a probability "
            f"(at most {FLOAT_MAX_PROBABILITY_DIFFERENCE})"
        )
    return None


def run_all(runners: dict[str, Runner], images: Iterable[np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(class probabilities of each runner over the same images, each image decoded once; {name: one-line
    reason} for runners that failed on an image, which then stop)."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    failed: dict[str, str] = {}
    for image in images:
        for name, run in runners.items():
            if name in failed:
                continue
            try:
                outputs[name].append(run(image))
            except Exception as error:  # noqa: BLE001 - a runtime's error is that format's failure
                failed[name] = f"fails in {FORMATS[name].runtime}: {failure_reason(error)}"
    return {name: np.array(rows) for name, rows in outputs.items() if name not in failed}, failed
