"""Running a frozen ImageNet base over images: the forward pass the features stage caches.

Each image goes through the base once (plus any augmented views), instead of once per epoch as in the
classic recipe; the head then trains on the cached arrays.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tlpipe import progress
from tlpipe.backbones import build_extractor, get_backbone
from tlpipe.datasets import image_dataset
from tlpipe.errors import PipelineError, first_line
from tlpipe.models import inference_function, quiet_converters, worth_freezing, write_onnx
from tlpipe.params import CPUINFO, bfloat16_hardware, resolve_weights
from tlpipe.runtime import usable_cores


def load_extractor(key: str, spec: dict[str, Any], seed: int = 0, precision: str = "float32") -> tuple[Any, int]:
    """(extractor, number of backbone parameters), with a clear error when the weights do not fit."""
    backbone = get_backbone(spec["arch"])
    weights = resolve_weights(spec["weights"], backbone.named_weights)
    try:
        extractor, base = build_extractor(spec["arch"], spec["image_size"], weights, seed, precision)
    except Exception as error:  # Keras raises a bare Exception when a weights download fails
        reason = first_line(error)
        if weights in backbone.named_weights and "fetch failure" in reason:
            raise PipelineError(
                f"cannot download the {weights} weights of {spec['arch']} ({reason}); without internet, set "
                f"backbones.{key}.weights to a local Keras weights file, or to null for random initialisation"
            ) from None
        raise PipelineError(
            f"cannot build {spec['arch']} with backbones.{key}.weights={spec['weights']!r}: {reason}"
        ) from None
    return extractor, base.count_params()


def deployment_cost(extractor: Any, image_size: int, forward: Callable[[Any], Any]) -> dict[str, Any]:
    """What the frozen base costs where it ships: the size of its float32 weights on disk (`base_bytes`) and
    the latency of `forward` (base_forward of `extractor`) on one image (tlpipe.latency).

    `extractor` must be the float32 one, as finetune ships it: bfloat16 extraction is emulated, so slower,
    on most CPUs, and nobody ships it. The pixels' values do not change the compute.
    """
    import tempfile

    from tlpipe.latency import latency_ms

    image = np.full((image_size, image_size, 3), 127.5, np.float32)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "base.weights.h5"
        extractor.save_weights(weights)
        base_bytes = weights.stat().st_size
    return {"base_bytes": base_bytes} | latency_ms(lambda pixels: forward(pixels[np.newaxis]), image)


def bfloat16_notice(precision: str, cpuinfo: Path = CPUINFO) -> str | None:
    """A warning when bfloat16 would be emulated: no GPU, and a Linux CPU without AVX512_BF16 or AMX."""
    if precision != "bfloat16" or not cpuinfo.is_file() or bfloat16_hardware(cpuinfo):
        return None
    return (
        "this CPU has no bfloat16 arithmetic (AVX512_BF16 or AMX), so bfloat16 extraction may be slower "
        "than float32; consider features.precision: float32"
    )


def traced(function: Callable[[Any], Any], image_size: int) -> Callable[[Any], Any]:
    """`function` (images -> tensor) as a tf.function traced once for any batch size, variables kept live.

    For the augmentation, whose random layers keep their seed state in variables; the frozen base goes
    through models.inference_function instead, which turns its weights into constants.
    """
    import tensorflow as tf

    compiled = tf.function(function, input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    compiled.get_concrete_function()
    return compiled


def base_forward(extractor: Any, image_size: int, n_images: int) -> Callable[[Any], Any]:
    """The extractor's forward pass as the stage runs it over `n_images`: models.inference_function, the
    weights as constants where that pays (models.worth_freezing)."""
    return inference_function(
        lambda images: extractor(images, training=False), (None, image_size, image_size, 3), worth_freezing(n_images)
    )


# Images per ONNX Runtime call: a few images at a time keep a layer's activations in the CPU's caches, where
# a whole batch of 32 spills them to memory (benchmarks/extraction.py measures both engines).
ONNX_IMAGES_PER_RUN = 4


def onnx_forward(extractor: Any, image_size: int) -> Callable[[Any], np.ndarray]:
    """The float32 extractor converted to ONNX (tlpipe.models.write_onnx, as the export stage converts) and run by
    ONNX Runtime on this machine's CPU cores: a batch of pixels in, its features out, as base_forward.

    Its threads sleep instead of spinning between calls: the next batch is decoded on the same cores
    meanwhile (LocalEngine.files), and spinning threads would take those cores from it.
    """
    import onnxruntime
    import tensorflow as tf

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="pixels")
    with tempfile.TemporaryDirectory(prefix="onnx-") as folder, quiet_converters():
        path = Path(folder) / "base.onnx"
        write_onnx(lambda images: extractor(images, training=False), spec, path, "pixels", "features")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(images: Any) -> np.ndarray:
        pixels = np.asarray(images, np.float32)
        return np.concatenate(
            [
                session.run(None, {"pixels": pixels[start : start + ONNX_IMAGES_PER_RUN]})[0]
                for start in range(0, len(pixels), ONNX_IMAGES_PER_RUN)
            ]
        )

    return forward


def has_depthwise_convolutions(model: Any) -> bool:
    """Whether `model`, at any depth, has a DepthwiseConv2D layer (MobileNet, EfficientNet)."""
    import keras

    if isinstance(model, keras.layers.DepthwiseConv2D):
        return True
    return any(has_depthwise_convolutions(layer) for layer in getattr(model, "layers", []))


def choose_engine(setting: str, precision: str, depthwise: bool, gpu: bool | None = None) -> tuple[str, str]:
    """(engine, why) for `features.engine`: a set value is itself; `auto` is ONNX Runtime where it measured
    faster than Keras (float32 on a CPU, a backbone of depthwise convolutions: benchmarks/extraction.py) and
    Keras (`local`) elsewhere. `gpu` None asks TensorFlow whether it sees one."""
    if setting != "auto":
        return setting, "set explicitly"
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        return "local", "auto: Keras runs the base on the GPU"
    if precision != "float32":
        return "local", f"auto: ONNX Runtime runs float32 only, and the precision is {precision}"
    if not depthwise:
        return "local", "auto: ONNX Runtime measured no faster than Keras on backbones without depthwise convolutions"
    return "onnx", "auto: ONNX Runtime measured faster than Keras on float32 depthwise convolutions on a CPU"


class Engine(Protocol):
    """What runs the frozen base over images for the features stage (`features.engine`): LocalEngine (with
    Keras' base_forward or ONNX Runtime's onnx_forward), or tlpipe.ray_engine.RayEngine. Each returns
    features in the order of its input."""

    def files(self, paths: list[str], desc: str) -> np.ndarray:
        """Features of the image files in `paths`, decoded and resized as datasets.image_dataset does."""

    def batches(self, batches: Iterable[Any], n_images: int, desc: str) -> np.ndarray:
        """Features of batches of images already decoded (augmented views), `n_images` in all."""


@dataclass(frozen=True)
class LocalEngine:
    """The base on this machine: `forward` is base_forward of the extractor (`features.engine: local`) or
    onnx_forward (`onnx`)."""

    forward: Callable[[Any], Any]
    image_size: int
    batch_size: int

    def files(self, paths: list[str], desc: str) -> np.ndarray:
        # On CPU the next batch is decoded while the model runs over this one, on the same cores; that costs
        # the forward pass only the decoding's own CPU time (see datasets.image_dataset).
        return self.batches(image_dataset(paths, self.image_size, self.batch_size), len(paths), desc)

    def batches(self, batches: Iterable[Any], n_images: int, desc: str) -> np.ndarray:
        features = []
        with progress.bar(n_images, desc) as shown:
            for images in batches:
                features.append(np.asarray(self.forward(images)))
                shown.update(len(features[-1]))
        return np.concatenate(features)


def extract(forward: Callable[[Any], Any], paths: list[str], image_size: int, batch_size: int, desc: str) -> np.ndarray:
    """Features of the images in `paths`, in order, on this machine."""
    return LocalEngine(forward, image_size, batch_size).files(paths, desc)


def extract_splits(engine: Engine, rows: dict[str, Any], desc: str) -> dict[str, np.ndarray]:
    """`x_<split>` features and `y_<split>` labels for each split of `rows` (manifest rows by split).

    One pass over every image, in the order of `rows`, then cut back into splits: a single progress bar.
    """
    every_image = engine.files([p for part in rows.values() for p in part["path"]], desc)
    ends = np.cumsum([len(part) for part in rows.values()])
    arrays: dict[str, np.ndarray] = {}
    for (split, part), features in zip(rows.items(), np.split(every_image, ends[:-1])):
        arrays[f"x_{split}"] = features
        arrays[f"y_{split}"] = part["label_index"].to_numpy()
    return arrays


def extract_views(
    engine: Engine,
    augmenter: Any,
    train_rows: Any,
    views: int,
    image_size: int,
    batch_size: int,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of `views` augmented copies of each training image.

    The augmentation is seeded and its random state advances batch by batch, so it runs here, in one stream
    whatever the engine: the views are the same on every engine and every run.
    """
    augment = traced(lambda images: augmenter(images, training=True), image_size)
    paths = list(train_rows["path"]) * views
    augmented = (augment(images) for images in image_dataset(paths, image_size, batch_size))
    features = engine.batches(augmented, len(paths), desc)
    return features, np.tile(train_rows["label_index"].to_numpy(), views)
