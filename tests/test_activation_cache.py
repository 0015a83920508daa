"""Fine-tuning on cached activations (tlpipe.activation_cache): the cut, the cache, its batches, its bound,
and that the model which ships is the one trained on the cache."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import PROJECT_ROOT, one_backbone_project, run, stages_in_process
from tests.synthetic import write_dataset_zip
from tlpipe import activation_cache
from tlpipe.activation_cache import (
    build_cache,
    cached_batches,
    cached_training,
    crossing_tensors,
    find_cut,
    frozen_part,
    plan_cache,
)
from tlpipe.backbones import build_base, get_backbone, preprocessing_layers
from tlpipe.finetuning import batch_forward, ship_model, unfreeze_top
from tlpipe.models import build_head, load_model, save_model

AUGMENT = {"flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}
SIZE = 32
BOUND = 10**12


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int = 4):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def shipped(arch: str, unfreeze: int | str, seed: int = 0, adapt: np.ndarray | None = None):
    """(model, base, head, cut) as the finetune stage builds them, randomly initialised at SIZE pixels; the
    head's normalization adapted to the base's features of `adapt` (random features would be far off their
    scale, and features of other images can be too: a feature nearly constant on these is huge on those)."""
    spec = {"arch": arch, "image_size": SIZE, "weights": None}
    pixels = images(20, seed + 100) if adapt is None else adapt
    for layer in preprocessing_layers(get_backbone(arch).preprocessing):
        pixels = layer(pixels)
    head = build_head(np.asarray(build_base(arch, SIZE, None, seed)(pixels)), 2, 0.2, 0)
    model, base = ship_model("k", spec, head, AUGMENT, seed)
    cut = find_cut(base, unfreeze_top(base, unfreeze))
    return model, base, head, cut


def identity(x):
    return x


# (arch, finetune.unfreeze, tensors that cross the cut). The top 30 layers of ResNet50 begin inside
# conv5_block1 and those of EfficientNetB0 inside block6d: the block's input crosses on the shortcut beside
# the last frozen layer's output. MobileNetV2's begin at block 14, whose input alone crosses (block 13 has
# no shortcut), VGG16's block5 after a plain chain, and with nothing unfrozen the base's output crosses.
CUTS = [
    ("MobileNetV2", 30, 1),
    ("ResNet50", 30, 2),
    ("EfficientNetB0", 30, 2),
    ("VGG16", "block5", 1),
    ("MobileNetV3Small", 30, 2),  # Keras ops between its layers (hard swish), which base.layers leaves out
    ("MobileNetV2", 0, 1),
]


@pytest.mark.parametrize(("arch", "unfreeze", "crossing"), CUTS)
def test_top_on_the_cut_computes_what_the_whole_base_computes(arch: str, unfreeze: int | str, crossing: int) -> None:
    """Bottom then top (through the flattened cache layout) gives the base's output; the top trains exactly
    the base's trainable variables, the same objects."""
    base = build_base(arch, SIZE, None)
    unfrozen = unfreeze_top(base, unfreeze)
    cut = find_cut(base, unfrozen)
    assert cut is not None and len(cut.layers) == crossing
    first = len(base.layers) - unfrozen
    frozen_names = {layer.name for layer in base.layers[:first]}
    assert set(cut.layers) <= frozen_names  # every crossing tensor comes from below the cut
    x = images(3)
    flat = np.asarray(cut.bottom(x, training=False))
    assert flat.shape == (3, cut.values_per_image)
    top = cut.training_model(identity)
    expected = np.asarray(base(x, training=False))
    np.testing.assert_allclose(
        np.asarray(top(flat, training=False)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )
    assert {id(v) for v in top.trainable_variables} == {id(v) for v in base.trainable_variables}
    assert len(base.trainable_variables) > 0 or unfreeze == 0


def test_crossing_tensors_of_a_cut_inside_a_residual_block() -> None:
    """ResNet50 cut between conv5_block1's first convolution and its second: the block's input (the previous
    block's output, which the shortcut carries to the block's add) and the first convolution's activation."""
    base = build_base("ResNet50", SIZE, None)
    first = [layer.name for layer in base.layers].index("conv5_block1_2_conv")
    names = [x._keras_history.operation.name for x in crossing_tensors(base, first)]
    assert names == ["conv4_block6_out", "conv5_block1_1_relu"]


def test_every_layer_unfrozen_leaves_nothing_to_cache() -> None:
    model, base, head, cut = shipped("VGG16", 30)  # VGG16 without its top has 19 layers and an input
    assert cut is None
    plan = plan_cache(cut, 2, 10, 100, 20, BOUND)
    assert plan.views == 0 and plan.bytes == 0
    assert "every layer of the base is unfrozen (finetune.unfreeze)" in plan.reason and "\n" not in plan.reason
    assert plan.metrics() == {"cached_views": 0, "cache_bytes": 0, "cache_bound_bytes": BOUND}


def test_cache_size_views_and_bound() -> None:
    model, base, head, cut = shipped("MobileNetV2", 30)
    per_image = math.prod(base.get_layer("block_13_project_BN").output.shape[1:])  # float32 values
    plan = plan_cache(cut, 3, 10, 100, 20, BOUND)
    assert plan.views == 3 and plan.bytes == 4 * per_image * (3 * 100 + 20)
    assert plan.metrics() == {"cached_views": 3, "cache_bytes": plan.bytes, "cache_bound_bytes": BOUND}
    assert plan_cache(cut, 5, 2, 100, 20, BOUND).views == 2  # an epoch uses one view: no more views than epochs
    assert plan_cache(cut, 0, 10, 100, 20, BOUND).views == 0
    over = plan_cache(cut, 3, 10, 100, 20, plan.bytes - 1)
    assert over.views == 0 and over.bytes == 0 and over.bound_bytes == plan.bytes - 1
    assert over.reason.startswith("finetune.cached_views: 3 views of 100 training images and 20 validation images")
    assert "over the cache's bound" in over.reason and "\n" not in over.reason
    assert plan_cache(cut, 3, 10, 100, 20, plan.bytes).views == 3


def test_the_bound_is_a_share_of_the_machine_memory() -> None:
    import psutil

    assert (
        0
        < activation_cache.cache_bound_bytes()
        <= psutil.virtual_memory().total * activation_cache.CACHE_MEMORY_FRACTION
    )


def test_views_are_reproducible_with_the_seed_and_val_is_unaugmented() -> None:
    x, y = images(10), np.arange(10) % 2
    caches = []
    for _ in range(2):
        model, base, head, cut = shipped("MobileNetV2", 30, seed=0)
        plan = plan_cache(cut, 3, 10, 6, 4, BOUND)
        frozen = frozen_part(model, base, cut, 10)
        caches.append(build_cache(frozen, plan, batches(x[:6], y[:6]), batches(x[6:], y[6:]), "k"))
    np.testing.assert_array_equal(caches[0].train, caches[1].train)
    np.testing.assert_array_equal(caches[0].val, caches[1].val)
    train = caches[0].train
    assert train.shape == (3, 6, cut.values_per_image)
    scale = np.abs(train).max()  # randomly initialised activations are tiny
    assert all(np.abs(train[v] - train[v + 1]).max() > 1e-3 * scale for v in range(2))  # each view draws anew
    # Validation: the images through the preprocessing and the bottom, without augmentation.
    pixels = x[6:]
    for layer in preprocessing_layers(get_backbone("MobileNetV2").preprocessing):
        pixels = layer(pixels)
    expected = np.asarray(cut.bottom(pixels, training=False))
    np.testing.assert_allclose(caches[0].val, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(caches[0].val - train[0, :4]).max() > 1e-3 * scale  # other images: a check that can fail


def test_each_epoch_reads_view_e_mod_v_in_a_new_seeded_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Keras' own fit: epoch e reads view e mod 2, each image once, in an order that changes every
    epoch and is the same with the same seed."""
    import keras

    n, views = 10, 2
    x = np.stack([np.full((n, 3), v, np.float32) for v in range(views)])
    y = np.arange(n) % 2
    served: list[list[tuple[int, int, int]]] = []
    for _ in range(2):
        data = cached_batches(x, y, batch_size=4, shuffle_seed=7)
        original = type(data).__getitem__
        calls: list[tuple[int, int, int]] = []

        def spy(self, index, original=original, calls=calls):
            inputs, labels = original(self, index)
            rows = self.order[index * 4 : (index + 1) * 4]
            calls.extend((self.epoch, int(inputs[0, 0]), int(row)) for row in rows)
            return inputs, labels

        monkeypatch.setattr(type(data), "__getitem__", spy)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer="sgd", loss="binary_crossentropy")
        model.fit(data, epochs=5, verbose=0, shuffle=False)
        served.append([call for call in calls if call[0] >= 0])  # not Keras' look at the first batches
    epochs = sorted({epoch for epoch, _, _ in served[0]})
    assert epochs == [0, 1, 2, 3, 4]
    orders = []
    for epoch in epochs:
        calls = [call for call in served[0] if call[0] == epoch]
        assert {view for _, view, _ in calls} == {epoch % views}
        rows = [row for _, _, row in calls]
        assert sorted(rows) == list(range(n))
        orders.append(rows)
    assert len({tuple(order) for order in orders}) == len(orders)  # a new order every epoch
    assert served[0] == served[1]  # the same seed, the same orders


def test_val_batches_are_in_order_without_views() -> None:
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10) % 2
    data = cached_batches(x, y, batch_size=4)
    got = np.concatenate([inputs for inputs, _ in data])
    np.testing.assert_array_equal(got, x)
    assert len(data) == 3


def test_the_shipped_model_is_the_model_trained_on_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After training on the cache (with the bottom's weights turned into constants, as for large datasets),
    the shipped model gives the validation images the probabilities the trained top gives their cached
    activations, also after saving and loading it."""
    import keras
    import tensorflow as tf

    monkeypatch.setattr(activation_cache, "worth_freezing", lambda n: True)
    # VGG16: randomly initialised, its features differ from image to image (MobileNetV2's are all but equal).
    x, y = images(14), np.arange(14) % 2
    model, base, head, cut = shipped("VGG16", "block5", adapt=x)
    plan = plan_cache(cut, 2, 3, 10, 4, BOUND)
    training = cached_training(
        "k",
        (model, base, head),
        plan,
        (batches(x[:10], y[:10]), batches(x[10:], y[10:])),
        (y[:10], y[10:]),
        4,
        0,
        tf.distribute.get_strategy(),
    )
    untrained = training.val_probabilities()
    training.model.compile(optimizer=keras.optimizers.Adam(1e-6), loss="binary_crossentropy")
    training.model.fit(training.train, epochs=2, verbose=0, shuffle=False)
    on_cache = training.val_probabilities()
    assert np.abs(on_cache - untrained).max() > 1e-3  # training moved them by far more than the tolerance
    assert on_cache[:, 1].std() > 1e-2  # the images get different probabilities: a comparison that can fail
    on_images = batch_forward(model, (SIZE, SIZE, 3))(x[10:])
    np.testing.assert_allclose(on_cache, on_images, rtol=1e-4, atol=1e-5)
    save_model(model, tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(batch_forward(loaded, (SIZE, SIZE, 3))(x[10:]), on_cache, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_finetune_stage_on_cached_activations_and_on_images(tmp_path: Path) -> None:
    """The stage with `cached_views: 2`, then with 0: each says what it caches, trains, and records the
    cache in metrics/finetune/metrics.json."""
    import yaml

    archive = write_dataset_zip(tmp_path / "data.zip", n_train=60, n_test=10, size=SIZE)
    project = one_backbone_project(
        tmp_path / "project",
        str(archive),
        "mobilenet",
        "MobileNetV2",
        SIZE,
        finetune={"unfreeze": 30, "epochs": 3, "batch_size": 16, "patience": 3, "cached_views": 2},
    )
    _, stderr = stages_in_process(
        project,
        ("fetch",),
        ("prepare",),
        ("features", "mobilenet"),
        ("crossval", "mobilenet"),
        ("train", "mobilenet"),
        ("finetune",),
    )
    splits = pd.read_csv(project / "data/prepared/manifest.csv")["split"].value_counts()
    n_train, n_val = int(splits["train"]), int(splits["val"])
    assert "mobilenet: caching 2 augmented views of" in stderr and "activations cached in" in stderr
    assert "the unfrozen top's forward pass on cached activations" in stderr
    metrics = json.loads((project / "metrics/finetune/metrics.json").read_text())
    base = build_base("MobileNetV2", SIZE, None)
    per_image = math.prod(base.get_layer("block_13_project_BN").output.shape[1:])
    assert metrics["cached_views"] == 2 and metrics["cache_bytes"] == 4 * per_image * (2 * n_train + n_val)
    assert metrics["cache_bound_bytes"] == activation_cache.cache_bound_bytes()
    assert metrics["step"] == 2  # three epochs
    labels = json.loads((project / "models/finetuned.labels.json").read_text())
    assert "temperature" in labels

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["cached_views"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _, stderr = stages_in_process(project, ("finetune",))
    assert "mobilenet: finetune.cached_views is 0: every epoch runs the whole model on the images" in stderr
    metrics = json.loads((project / "metrics/finetune/metrics.json").read_text())
    assert metrics["cached_views"] == 0 and metrics["cache_bytes"] == 0


MIRRORED_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
sys.path.insert(0, {root!r})
from tlpipe.runtime import configure_devices, strategy_for
settings = {{"strategy": "mirrored", "cpu_replicas": 2}}
configure_devices(settings)
from tests.test_activation_cache import batches, images, plan_cache, shipped, BOUND, SIZE
from tlpipe.activation_cache import cached_training
from tlpipe.finetuning import batch_forward, fine_tune
strategy = strategy_for(settings)
x, y = images(14), np.arange(14) % 2
with strategy.scope():
    model, base, head, cut = shipped("VGG16", "block5", adapt=x)
plan = plan_cache(cut, 2, 2, 10, 4, BOUND)
data = (batches(x[:10], y[:10]), batches(x[10:], y[10:]))
training = cached_training("k", (model, base, head), plan, data, (y[:10], y[10:]), 4, 0, strategy)
settings = {{"learning_rate": 1e-6, "epochs": 2, "patience": 2}}
result = fine_tune("k", training, strategy, y[:10], 4, 2, settings, None, [])
print("replicas", strategy.num_replicas_in_sync, "epochs", len(result.history["loss"]))
on_images = batch_forward(model, (SIZE, SIZE, 3))(x[10:])
print("largest difference", float(np.abs(training.val_probabilities() - on_images).max()))
"""


@pytest.mark.slow
def test_fine_tuning_on_the_cache_under_mirrored(tmp_path: Path) -> None:
    """distribute.strategy: mirrored (two logical CPUs, which must be set up before TensorFlow starts: a
    process of its own) trains on the cache, and the shipped model still equals the trained top."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT.format(root=str(PROJECT_ROOT)))
    result = run([sys.executable, str(script)], PROJECT_ROOT)
    assert "replicas 2 epochs 2" in result.stdout, result.stdout + result.stderr
    assert float(result.stdout.split("largest difference")[-1]) < 1e-4
