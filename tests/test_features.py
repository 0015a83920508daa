"""Feature extraction: compact storage, and one-line errors when a backbone's weights cannot be had."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.common import PipelineError
from stages.features import compact, load_extractor


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
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] Name or service not known")

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
