"""The backbone registry: preprocessing as layers equals Keras' own preprocess_input; every default builds."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from tests.helpers import tiny_backbones
from tlpipe.backbones import REGISTRY, build_extractor, get_backbone, preprocessing_layers
from tlpipe.errors import PipelineError

KERAS_PREPROCESS = {  # arch -> the module whose preprocess_input the registry must reproduce
    "VGG16": "keras.applications.vgg16",
    "ResNet50": "keras.applications.resnet50",
    "InceptionV3": "keras.applications.inception_v3",
    "MobileNetV2": "keras.applications.mobilenet_v2",
    "DenseNet121": "keras.applications.densenet",
    "EfficientNetB0": "efficientnet.tfkeras",
}


@pytest.mark.parametrize("arch", list(KERAS_PREPROCESS))
def test_preprocessing_layers_match_keras_preprocess_input(arch: str) -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = importlib.import_module(KERAS_PREPROCESS[arch]).preprocess_input(pixels.copy())
    actual = pixels
    for layer in preprocessing_layers(REGISTRY[arch].preprocessing):
        actual = np.asarray(layer(actual))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_unknown_arch_names_the_allowed_ones() -> None:
    with pytest.raises(PipelineError, match=r"unknown arch 'AlexNet'; allowed: VGG16, VGG19"):
        get_backbone("AlexNet")


@pytest.mark.slow
@pytest.mark.parametrize("key", list(tiny_backbones()))
def test_every_default_backbone_builds_frozen_and_pooled(key: str) -> None:
    spec = tiny_backbones()[key]
    extractor, base = build_extractor(spec["arch"], spec["image_size"], None)
    size = spec["image_size"]
    features = np.asarray(extractor(np.zeros((2, size, size, 3), "float32"), training=False))
    assert features.ndim == 2 and features.shape[0] == 2 and features.shape[1] >= 512
    assert not base.trainable and extractor.trainable_weights == []


@pytest.mark.slow
def test_a_random_base_is_the_same_in_every_stage_that_builds_it() -> None:
    """features and finetune each rebuild the base; with weights: null they must get the same one."""
    from tlpipe.backbones import build_base

    first = build_base("MobileNetV2", 32, None, seed=5)
    second = build_base("MobileNetV2", 32, None, seed=5)
    other = build_base("MobileNetV2", 32, None, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), other.get_weights()))


@pytest.mark.slow
def test_bfloat16_extraction_computes_in_bfloat16_and_returns_float32() -> None:
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    full, _ = build_extractor("ResNet50", 64, None, seed=1)
    half, half_base = build_extractor("ResNet50", 64, None, seed=1, precision="bfloat16")
    assert keras.config.dtype_policy().name == "float32", "the global policy must be restored after the build"
    convolution = next(layer for layer in half_base.layers if isinstance(layer, keras.layers.Conv2D))
    assert (convolution.compute_dtype, convolution.variable_dtype) == ("bfloat16", "float32")
    assert half.get_layer("preprocess_caffe").compute_dtype == "float32"
    expected = np.asarray(full(pixels, training=False))
    actual = half(pixels, training=False)
    assert actual.dtype == "float32"
    relative_error = np.abs(np.asarray(actual) - expected).mean() / np.abs(expected).mean()
    assert 0 < relative_error < 0.05, relative_error
