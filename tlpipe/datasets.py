"""Reading what `prepare` wrote, and `tf.data` pipelines over the images it lists."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tlpipe.errors import PipelineError
from tlpipe.files import read_json
from tlpipe.paths import CLASSES, DROPPED_TEST, MANIFEST
from tlpipe.runtime import usable_cores

# The name of the training-time augmentation inside a shipped model (identity at inference; export leaves it out).
AUGMENTATION_LAYER = "augmentation"

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

SPLITS = ("train", "val", "test")


def read_classes(path: Path = CLASSES) -> list[str]:
    classes = read_json(path)
    if not isinstance(classes, list) or len(classes) < 2:
        raise PipelineError(f"{path} must list two or more classes; rerun dvc repro prepare")
    return classes


def read_manifest(path: Path = MANIFEST) -> pd.DataFrame:
    """The image list (path, label, split, sha256), with `label_index` added from classes.json."""
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run dvc repro prepare") from None
    missing = {"path", "label", "split", "sha256"} - set(manifest.columns)
    if missing:
        raise PipelineError(f"{path} lacks columns {sorted(missing)}; rerun dvc repro prepare")
    index = {name: i for i, name in enumerate(read_classes(path.parent / CLASSES.name))}
    unknown = set(manifest["label"]) - index.keys()
    if unknown:
        raise PipelineError(f"{path} has labels {sorted(unknown)} that classes.json lacks; rerun dvc repro prepare")
    manifest["label_index"] = manifest["label"].map(index).astype("int64")
    return manifest


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise PipelineError(f"{MANIFEST} has no {split} images; check the dataset layout and data.val_fraction")
    return rows


def scored_test_rows(manifest: pd.DataFrame, dropped: Path = DROPPED_TEST) -> tuple[pd.DataFrame, np.ndarray]:
    """The test images every evaluation scores, and a mask of them over the test split's rows: the whole
    split, less the images the audit dropped for having a copy in train or val (audit.leakage: drop)."""
    rows = split_rows(manifest, "test")
    try:
        left_out = set(pd.read_csv(dropped, dtype=str, keep_default_na=False)["path"])
    except FileNotFoundError:
        raise PipelineError(f"{dropped} is missing; run dvc repro audit") from None
    except (KeyError, ValueError, pd.errors.ParserError):
        raise PipelineError(f"{dropped} is unreadable or has no path column; rerun dvc repro -f audit") from None
    keep = ~rows["path"].isin(left_out).to_numpy()
    if not keep.any():
        raise PipelineError(f"{dropped} leaves no test image to score; the test split is all copies of train/val")
    return rows[keep], keep


def resized_image(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image file contents -> float32 RGB in 0..255 at image_size x image_size (bilinear, as
    keras.layers.Resizing)."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    return tf.ensure_shape(image, (image_size, image_size, 3))


def decode_resized(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """File -> float32 RGB in 0..255 at image_size x image_size (resized_image of its contents)."""
    import tensorflow as tf

    return resized_image(tf.io.read_file(path), image_size)


def image_dataset(
    paths: list[str],
    image_size: int,
    batch_size: int,
    labels: np.ndarray | None = None,
    shuffle_seed: int | None = None,
    autotune: bool | None = None,
) -> tf.data.Dataset:
    """Batches of resized images (and labels), decoded in parallel; in manifest order unless shuffled.

    With `shuffle_seed` the order changes every epoch but is the same on every run. With `autotune`
    (by default: when there is a GPU), tf.data's autotuner sets the parallelism and the prefetch depth.
    Without it every setting is explicit: one decoding thread per core, and tf.data fuses the map with the
    batch, which then decodes one batch ahead of the consumer; the autotuner is off.
    """
    import tensorflow as tf

    items = tf.data.Dataset.from_tensor_slices(paths if labels is None else (paths, labels))
    if shuffle_seed is not None:
        items = items.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    if labels is None:
        decode = lambda path: decode_resized(path, image_size)  # noqa: E731
    else:
        decode = lambda path, label: (decode_resized(path, image_size), label)  # noqa: E731
    return _decoded_batches(items, decode, batch_size, autotune)


def encoded_image_dataset(contents: list[bytes], image_size: int, batch_size: int) -> tf.data.Dataset:
    """image_dataset over the files' contents instead of their paths: for a worker that cannot see the files
    (tlpipe.ray_engine). The same decoding, so the same pixels."""
    import tensorflow as tf

    items = tf.data.Dataset.from_tensor_slices(tf.constant(contents, tf.string))
    return _decoded_batches(items, lambda encoded: resized_image(encoded, image_size), batch_size, None)


def _decoded_batches(items: tf.data.Dataset, decode: Any, batch_size: int, autotune: bool | None) -> tf.data.Dataset:
    import tensorflow as tf

    if autotune is None:
        autotune = bool(tf.config.list_logical_devices("GPU"))
    parallel = tf.data.AUTOTUNE if autotune else usable_cores()
    images = items.map(decode, num_parallel_calls=parallel, deterministic=True)
    batches = images.batch(batch_size)
    if autotune:
        return batches.prefetch(tf.data.AUTOTUNE)
    # On CPU the model needs every core, and the autotuner only costs: its model thread competes with the
    # model for the cores and held up the iterator's deletion (docs/performance.md has the measurements).
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.with_options(options)


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """In-memory arrays as batches; with `shuffle_seed`, reshuffled every epoch in the same order on every run.

    Keras' fit() over numpy arrays rebuilds its input pipeline every epoch, a large share of an epoch of a
    head on cached features; a dataset over the arrays is built once.
    """
    import tensorflow as tf

    items = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        items = items.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    return items.batch(batch_size)


def augmentation_layers(augment: dict[str, Any], seed: int) -> keras.Sequential:
    """The training-time augmentation, as Keras preprocessing layers (identity at inference)."""
    import keras

    layers: list[keras.layers.Layer] = []
    if augment["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augment["rotation"]:
        layers.append(keras.layers.RandomRotation(augment["rotation"], fill_mode="reflect", seed=seed + 1))
    if augment["zoom"]:
        layers.append(keras.layers.RandomZoom(augment["zoom"], fill_mode="reflect", seed=seed + 2))
    if augment["translation"]:
        t = augment["translation"]
        layers.append(keras.layers.RandomTranslation(t, t, fill_mode="reflect", seed=seed + 3))
    if augment["contrast"]:
        layers.append(keras.layers.RandomContrast(augment["contrast"], value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name=AUGMENTATION_LAYER)
