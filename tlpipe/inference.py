"""Running a classifier in its own runtime on a batch of images: what predict, evaluate_model and export share.

Every runtime here takes what models/model.keras takes, a float32 batch [n, H, W, 3] of raw RGB pixels
(0..255), and returns the model's raw outputs (one sigmoid column for two classes; scoring.class_probabilities
turns them into class probabilities):
- TensorFlow runs a Keras model (keras_outputs) or a SavedModel folder;
- LiteRT (`ai-edge-litert`) runs a .tflite file;
- ONNX Runtime runs a .onnx file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.models import inference_function, worth_freezing
from tlpipe.runtime import usable_cores

# A batch of raw RGB images [n, H, W, 3] -> the model's raw outputs [n, k].
Outputs = Callable[[np.ndarray], np.ndarray]

TENSORFLOW, LITERT, ONNX_RUNTIME = "TensorFlow", "LiteRT", "ONNX Runtime"
# Model files other than Keras' own, by suffix; anything else is loaded by Keras.
RUNTIME_OF_SUFFIX = {".tflite": LITERT, ".onnx": ONNX_RUNTIME}


def keras_outputs(model: Any, n_images: int) -> Outputs:
    """The Keras model compiled once for any batch and image size (and with the weights as constants where
    `n_images` pay for it: models.worth_freezing)."""
    forward = inference_function(
        lambda images: model(images, training=False), (None, None, None, 3), worth_freezing(n_images)
    )
    return lambda images: forward(images).numpy()


def one_image(classify: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A function of a batch as a function of one image (H, W, 3)."""
    return lambda image: classify(image[np.newaxis])[0]


def runtime_outputs(runtime: str, path: Path) -> tuple[Outputs, int | None]:
    """The exported model at `path` loaded in `runtime` (TENSORFLOW: a SavedModel folder), and how many
    outputs it has per image (None where the runtime does not say before it runs)."""
    if runtime == LITERT:
        return tflite_outputs(path)
    if runtime == ONNX_RUNTIME:
        return onnx_outputs(path)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    # The loaded object owns the variables: the function alone would outlive them.
    return (lambda images: loaded.serve(tf.constant(images)).numpy()), None


def tflite_outputs(path: Path) -> tuple[Outputs, int]:
    """LiteRT's interpreter, a thread per usable core; its input is resized (and its tensors reallocated)
    only when the batch's shape changes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=usable_cores())
    input_index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]
    shape: list[tuple[int, ...]] = [()]

    def run(images: np.ndarray) -> np.ndarray:
        if images.shape != shape[0]:
            interpreter.resize_tensor_input(input_index, list(images.shape))
            interpreter.allocate_tensors()
            shape[0] = images.shape
        interpreter.set_tensor(input_index, np.ascontiguousarray(images, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(output["index"]).copy()

    return run, int(output["shape"][-1])


def onnx_outputs(path: Path) -> tuple[Outputs, int | None]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    width = session.get_outputs()[0].shape[-1]
    run = lambda images: session.run(None, {input_name: np.asarray(images, dtype=np.float32)})[0]  # noqa: E731
    return run, width if isinstance(width, int) else None
