"""The cached features of one backbone (data/features/<key>/): the one place their format is written and read.

features.npz holds `x_<split>` (pooled features) and `y_<split>` (class indices) for train, val and test,
plus `x_train_aug`/`y_train_aug` (augmented views of the training images; empty without views).
meta.json says what made them: backbone, weights, precision, parameter count and extraction speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlpipe.errors import PipelineError
from tlpipe.files import atomic_dir, read_json, write_json
from tlpipe.paths import features_dir

ARRAYS = "features.npz"
META = "meta.json"


def compact(features: np.ndarray) -> np.ndarray:
    """float16 when it keeps every value to 1e-3 of the largest (it does for ImageNet weights), else float32.

    Halving the cache costs nothing in accuracy for real weights; randomly initialised bases can produce
    activations so small that float16 would flush them to zero.
    """
    scale = float(np.abs(features).max(initial=0.0))
    halved = features.astype(np.float16)
    if 0.0 < scale < 6.0e4 and float(np.abs(halved - features).max()) <= 1e-3 * scale:
        return halved
    return features.astype(np.float32)


def write_features(key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the whole cache of `key` at once: a killed run leaves the previous cache, never half of one."""
    with atomic_dir(features_dir(key)) as out_dir:
        np.savez(out_dir / ARRAYS, **arrays)
        write_json(out_dir / META, meta)


def load_features(key: str) -> dict[str, np.ndarray]:
    path = features_dir(key) / ARRAYS
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run dvc repro features@{key}") from None
    except (ValueError, OSError) as error:
        raise PipelineError(f"{path} is unreadable ({error}); run dvc repro -f features@{key}") from None


def load_meta(key: str) -> dict[str, Any]:
    return read_json(features_dir(key) / META)


def training_arrays(features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The original training features followed by their augmented views."""
    x = np.concatenate([features["x_train"], features["x_train_aug"]]).astype(np.float32)
    y = np.concatenate([features["y_train"], features["y_train_aug"]])
    return x, y
