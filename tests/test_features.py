"""Feature extraction: constant-weight forward pass, decoding keeps order with or without the tf.data autotuner,
compact storage, one-line errors about weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tlpipe.backbones import PRECISIONS, build_extractor
from tlpipe.errors import PipelineError
from tlpipe.extraction import bfloat16_notice, extract, load_extractor, traced
from tlpipe.feature_cache import compact
from tlpipe.models import inference_function


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("freeze", [True, False])
def test_constant_weight_forward_pass_gives_the_keras_models_features(precision: str, freeze: bool) -> None:
    # Batch norm with trained statistics, so that folding it into the convolutions would show.
    extractor, base = build_extractor("MobileNetV2", 32, None, seed=3, precision=precision)
    rng = np.random.default_rng(0)
    for layer in base.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, gamma.shape),
                    rng.normal(0, 0.5, beta.shape),
                    rng.normal(0, 0.5, mean.shape),
                    rng.uniform(0.5, 2, variance.shape),
                ]
            )
    forward = inference_function(lambda images: extractor(images, training=False), (None, 32, 32, 3), freeze)
    pixels = rng.uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    expected = np.asarray(extractor(pixels, training=False))
    tolerance = 1e-4 if precision == "float32" else 2e-2
    scale = float(np.abs(expected).max())
    assert scale > 0
    for batch in (pixels, pixels[:2]):  # a short last batch takes the same compiled function
        features = forward(batch)
        assert features.dtype == "float32" and features.shape == (len(batch), 1280)
        np.testing.assert_allclose(features.numpy(), expected[: len(batch)], atol=tolerance * scale)


def test_only_jobs_of_many_images_turn_the_weights_into_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion costs seconds per process, which a few images never pay back."""
    from tensorflow.python.framework import convert_to_constants

    from tlpipe.extraction import base_forward
    from tlpipe.models import FREEZE_FROM_IMAGES

    converted = []
    monkeypatch.setattr(
        convert_to_constants, "convert_variables_to_constants_v2", lambda function: converted.append(function)
    )
    extractor, _ = build_extractor("MobileNetV2", 32, None, seed=3, precision="float32")
    forward = base_forward(extractor, 32, n_images=FREEZE_FROM_IMAGES - 1)
    assert forward(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 1280) and converted == []
    base_forward(extractor, 32, n_images=FREEZE_FROM_IMAGES)
    assert len(converted) == 1


def test_real_scale_features_are_stored_as_float16() -> None:
    features = np.random.default_rng(0).gamma(1.0, 2.0, (50, 64)).astype(np.float32)
    stored = compact(features)
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), features, rtol=1e-3, atol=1e-3)


def test_features_too_small_for_float16_stay_float32() -> None:
    features = np.random.default_rng(0).uniform(0, 1e-6, (10, 8)).astype(np.float32)
    stored = compact(features)
    assert stored.dtype == np.float32 and np.array_equal(stored, features)


def test_unreachable_imagenet_weights_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from keras.src.utils import file_utils

    def offline(*args: object, **kwargs: object) -> None:
        # What keras.utils.get_file raises without a network connection.
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] Name or service not known"
        )

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(PipelineError) as error:
        load_extractor("resnet50", {"arch": "ResNet50", "image_size": 32, "weights": "imagenet"})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot download the imagenet weights of ResNet50")
    assert "set backbones.resnet50.weights to a local Keras weights file, or to null" in message


def test_weights_of_another_architecture_are_one_line(tmp_path: Path) -> None:
    import keras

    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(other)
    with pytest.raises(PipelineError) as error:
        load_extractor("vgg16", {"arch": "VGG16", "image_size": 32, "weights": str(other)})
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"cannot build VGG16 with backbones.vgg16.weights='{other}'")


@pytest.mark.slow
def test_a_weights_file_saved_by_the_user_is_loaded(tmp_path: Path) -> None:
    import keras

    saved = tmp_path / "resnet.weights.h5"
    keras.utils.set_random_seed(3)
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    reference.save_weights(saved)
    extractor, n_params = load_extractor("resnet50", {"arch": "ResNet50", "image_size": 32, "weights": str(saved)})
    assert n_params == reference.count_params()
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    from keras.applications.resnet50 import preprocess_input

    expected = reference.predict(preprocess_input(pixels.copy()), verbose=0)
    np.testing.assert_allclose(extractor.predict(pixels, verbose=0), expected, rtol=1e-4, atol=1e-4)


def grey_pngs(folder: Path, levels: list[int]) -> list[str]:
    """One small PNG per grey level, each a different size so that every one is resized."""
    from PIL import Image

    paths = []
    for i, level in enumerate(levels):
        paths.append(str(folder / f"{i}.png"))
        Image.new("RGB", (20 + i % 3, 12), (level, level, level)).save(paths[-1])
    return paths


def test_extraction_keeps_the_order_of_the_paths_across_batches(tmp_path: Path) -> None:
    import tensorflow as tf

    grey_levels = list(range(5, 255, 7))[:35]  # 35 images: 17 batches of 2 and a short one
    paths = grey_pngs(tmp_path, grey_levels)
    mean_colour = traced(lambda images: tf.reduce_mean(images, axis=[1, 2]), 8)
    features = extract(mean_colour, paths, 8, 2, "test")
    np.testing.assert_allclose(features, np.repeat(np.array(grey_levels, "float32")[:, None], 3, axis=1), atol=1e-3)


@pytest.mark.parametrize("shuffle_seed", [None, 7])
def test_the_cpu_settings_give_the_autotuners_batches_without_the_autotuner(
    tmp_path: Path, shuffle_seed: int | None
) -> None:
    from tlpipe.datasets import image_dataset

    levels = list(range(10, 250, 20))
    paths, labels = grey_pngs(tmp_path, levels), np.arange(len(levels)) % 2
    explicit = image_dataset(paths, 8, 5, labels, shuffle_seed)  # no GPU here: explicit settings
    tuned = image_dataset(paths, 8, 5, labels, shuffle_seed, autotune=True)
    assert explicit.options().autotune.enabled is False
    assert tuned.options().autotune.enabled is not False

    def two_epochs(dataset: Any) -> list[np.ndarray]:
        return [np.concatenate([images[:, 0, 0, 0].numpy() for images, _ in dataset]) for _ in range(2)]

    first, second = two_epochs(explicit)
    np.testing.assert_array_equal(np.stack([first, second]), np.stack(two_epochs(tuned)))
    assert sorted(first.round().astype(int)) == levels
    assert (first.round().astype(int).tolist() == levels) == (shuffle_seed is None)
    assert (first.tolist() == second.tolist()) == (shuffle_seed is None)  # reshuffled every epoch


@pytest.mark.parametrize(
    ("flags", "warned"),
    [("fpu avx512f avx512_bf16 fma", False), ("fpu amx_bf16 amx_tile", False), ("fpu avx2 fma", True)],
)
def test_bfloat16_on_a_cpu_without_bfloat16_arithmetic_gets_a_notice(tmp_path: Path, flags: str, warned: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    notice = bfloat16_notice("bfloat16", cpuinfo)
    assert (notice is not None) == warned
    assert bfloat16_notice("float32", cpuinfo) is None
    if warned:
        assert "features.precision: float32" in notice and "\n" not in notice
