"""The backbone registry: one table maps an `arch` name to its constructor, preprocessing and pooling.

Adding a backbone is one entry in `REGISTRY`; adding one to `params.yaml` needs no code at all.
Keras is imported lazily so that validating parameters stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

# Per-channel constants of the three ImageNet preprocessing conventions (inputs in 0..255, RGB).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    arch: str
    constructor: Callable[..., keras.Model]
    preprocessing: str  # caffe | tf | torch | none (the model rescales by itself)
    default_image_size: int = 224
    min_image_size: int = 32
    named_weights: tuple[str, ...] = ("imagenet",)
    pooling: str = "avg"
    # Modules that must be imported before a saved model that contains this backbone can load.
    loader_imports: tuple[str, ...] = ()


def _keras_application(arch: str) -> Callable[..., keras.Model]:
    def build(**kwargs: object) -> keras.Model:
        import keras

        return getattr(keras.applications, arch)(**kwargs)

    return build


def _efficientnet_package(arch: str) -> Callable[..., keras.Model]:
    def build(**kwargs: object) -> keras.Model:
        import efficientnet.tfkeras as efficientnet_tfkeras

        return getattr(efficientnet_tfkeras, arch)(**kwargs)

    return build


def _keras(arch: str, preprocessing: str, size: int = 224, min_size: int = 32) -> Backbone:
    return Backbone(arch, _keras_application(arch), preprocessing, size, min_size)


def _efficientnet(arch: str, size: int) -> Backbone:
    return Backbone(
        arch,
        _efficientnet_package(arch),
        "torch",
        size,
        named_weights=("imagenet", "noisy-student"),
        loader_imports=("efficientnet.tfkeras",),
    )


REGISTRY: dict[str, Backbone] = {
    b.arch: b
    for b in [
        _keras("VGG16", "caffe"),
        _keras("VGG19", "caffe"),
        _keras("ResNet50", "caffe"),
        _keras("ResNet101", "caffe"),
        _keras("ResNet152", "caffe"),
        _keras("ResNet50V2", "tf"),
        _keras("ResNet101V2", "tf"),
        _keras("ResNet152V2", "tf"),
        _keras("InceptionV3", "tf", 299, 75),
        _keras("InceptionResNetV2", "tf", 299, 75),
        _keras("Xception", "tf", 299, 71),
        _keras("MobileNet", "tf"),
        _keras("MobileNetV2", "tf"),
        _keras("MobileNetV3Small", "none"),
        _keras("MobileNetV3Large", "none"),
        _keras("DenseNet121", "torch"),
        _keras("DenseNet169", "torch"),
        _keras("DenseNet201", "torch"),
        _keras("NASNetMobile", "tf"),
        _keras("NASNetLarge", "tf", 331),
        _keras("EfficientNetV2B0", "none"),
        _keras("EfficientNetV2B1", "none", 240),
        _keras("EfficientNetV2B2", "none", 260),
        _keras("EfficientNetV2B3", "none", 300),
        _keras("EfficientNetV2S", "none", 384),
        _keras("ConvNeXtTiny", "none"),
        _keras("ConvNeXtSmall", "none"),
        _keras("ConvNeXtBase", "none"),
        _efficientnet("EfficientNetB0", 224),
        _efficientnet("EfficientNetB1", 240),
        _efficientnet("EfficientNetB2", 260),
        _efficientnet("EfficientNetB3", 300),
        _efficientnet("EfficientNetB4", 380),
        _efficientnet("EfficientNetB5", 456),
        _efficientnet("EfficientNetB6", 528),
        _efficientnet("EfficientNetB7", 600),
    ]
}


def get_backbone(arch: str) -> Backbone:
    from tlpipe.errors import PipelineError

    try:
        return REGISTRY[arch]
    except KeyError:
        raise PipelineError(f"unknown arch {arch!r}; allowed: {', '.join(REGISTRY)}") from None


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Built-in Keras layers that turn RGB pixels in 0..255 into what the backbone expects.

    Built-in layers (not a Lambda) keep a saved model loadable with plain `keras.models.load_model`.
    """
    import keras
    import numpy as np

    if mode == "none":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        std = np.array(TORCH_STD)
        return [
            keras.layers.Rescaling(1 / 255.0, name="preprocess_scale"),
            keras.layers.Normalization(mean=list(TORCH_MEAN), variance=list(std**2), name="preprocess_torch"),
        ]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as one fixed affine map on the channel axis.
        rgb_to_bgr = np.eye(3, dtype="float32")[::-1]
        layer = keras.layers.Dense(3, trainable=False, name="preprocess_caffe")
        layer.build((None, None, None, 3))
        layer.set_weights([rgb_to_bgr, -np.array(CAFFE_BGR_MEAN, dtype="float32")])
        return [layer]
    raise ValueError(f"unknown preprocessing mode {mode!r}")


PRECISIONS = ("float32", "bfloat16")


def build_base(
    arch: str, image_size: int, weights: str | None, seed: int = 0, precision: str = "float32"
) -> keras.Model:
    """The frozen, pooled backbone for `image_size` x `image_size` RGB inputs in backbone scale.

    Seeding right before construction makes a random initialisation (`weights: null`) the same in every
    stage that builds it, so the head trained on `features` fits the base that `finetune` rebuilds.
    `precision: bfloat16` computes in bfloat16 (Keras' mixed_bfloat16 policy: weights stay float32).
    """
    import keras

    backbone = get_backbone(arch)
    keras.utils.set_random_seed(seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        base = backbone.constructor(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            pooling=backbone.pooling,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    base.trainable = False
    return base


def build_extractor(
    arch: str, image_size: int, weights: str | None, seed: int = 0, precision: str = "float32"
) -> tuple[keras.Model, keras.Model]:
    """(extractor, base): the extractor maps raw RGB pixels (0..255) of the given size to float32 pooled features.

    Preprocessing stays float32 whatever the precision, so pixels are scaled and centred before the base's
    first layer rounds them to bfloat16's 8 significant bits.
    """
    import keras

    backbone = get_backbone(arch)
    base = build_base(arch, image_size, weights, seed, precision)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    for layer in preprocessing_layers(backbone.preprocessing):
        x = layer(x)
    features = base(x, training=False)
    if features.dtype != "float32":
        features = keras.layers.Activation("linear", dtype="float32", name="features_float32")(features)
    return keras.Model(inputs, features, name=f"{arch}_extractor"), base
