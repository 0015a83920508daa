"""Fine-tuning on cached activations: the frozen bottom of the base runs once, not once per epoch.

Fine-tuning trains only the top of the base (params.yaml `finetune.unfreeze`); every layer below the first
unfrozen one is frozen, batch norm in inference mode, so it computes the same function of its input in every
epoch. With `finetune.cached_views: V` the stage
- makes V augmented views of each training image with the shipped model's own augmentation layers (seeded),
  and runs them once through the frozen part: the model's resizing and preprocessing and the base up to the cut;
- keeps every tensor that crosses the cut (a cut inside a residual block has two: the block's input, which
  the shortcut carries past the cut, and the last frozen layer's output), flattened side by side;
- does the same once for the validation images, unaugmented;
- trains the top of the base and the head on the cache: epoch e on view e mod V, reshuffled every epoch.

The top model reuses the base's own layer objects, so the model that ships (raw images -> probabilities, the
same layers as without a cache) holds the weights it trained. Where the cut is at the base's input (every
layer unfrozen) there is nothing to cache, and fine-tuning runs on the images as without one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.datasets import AUGMENTATION_LAYER, image_dataset
from tlpipe.files import gigabytes, megabytes
from tlpipe.finetuning import Training, batch_forward
from tlpipe.models import inference_function, worth_freezing
from tlpipe.progress import TIMED_BATCHES, bar, duration

# The cache lives in memory, in float32 (the values the base computes, so the top trains on exactly its
# inputs); it may take at most this share of the machine's memory, which leaves room for TensorFlow, the
# model, its optimizer state and the batches.
CACHE_MEMORY_FRACTION = 0.5
# Where a container's memory is limited, cgroups say so (v2, then v1); psutil reports the host's.
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def machine_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit where lower."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for limit in CGROUP_LIMITS:
        try:
            value = limit.read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def cache_bound_bytes() -> int:
    return int(CACHE_MEMORY_FRACTION * machine_memory_bytes())


def crossing_tensors(base: Any, first: int) -> list[Any]:
    """Every tensor of `base`'s graph that an operation from base.layers[first] on reads and one before it
    wrote, and the base's outputs that one before it wrote: what the top needs from the bottom. In the
    order of the operations that wrote them.

    Operations, not layers: some architectures (MobileNetV3's hard swish, ConvNeXt's) apply Keras ops
    between layers, which base.layers leaves out. Both lists are in the graph's topological order.
    """
    operations = base.operations
    index = {id(operation): i for i, operation in enumerate(operations)}
    cut = index[id(base.layers[first])] if first < len(base.layers) else len(operations)

    def producer(tensor: Any) -> int:
        return index[id(tensor._keras_history.operation)]

    found: dict[int, Any] = {}
    # Only the base's own nodes: a layer also used elsewhere (the top model below) has nodes of other graphs.
    for nodes in base._nodes_by_depth.values():
        for node in nodes:
            if index[id(node.operation)] >= cut:
                found |= {id(x): x for x in node.input_tensors if producer(x) < cut}
    found |= {id(x): x for x in base.outputs if producer(x) < cut}
    return sorted(found.values(), key=lambda x: (producer(x), x._keras_history.tensor_index))


@dataclass(frozen=True)
class Cut:
    """Where the frozen bottom of the base ends and the trainable top begins."""

    bottom: Any  # keras.Model: the base's input -> the crossing tensors, flattened and side by side
    top: Any  # keras.Model: the crossing tensors -> the base's output; None where the cut is at the output
    layers: tuple[str, ...]  # the layers whose outputs cross, one per tensor
    shapes: tuple[tuple[int, ...], ...]  # each crossing tensor's shape for one image

    @property
    def values_per_image(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def describe(self) -> str:
        """`2 tensors cross it: conv4_block6_out (14 x 14 x 1024), conv5_block1_1_relu (7 x 7 x 512)`"""
        parts = ", ".join(f"{name} ({' x '.join(map(str, shape))})" for name, shape in zip(self.layers, self.shapes))
        many = len(self.layers) > 1
        return f"{len(self.layers)} tensor{'s cross' if many else ' crosses'} it: {parts}"

    def training_model(self, head: Any) -> Any:
        """The model fine-tuning trains on the cache: flattened activations -> the top of the base (batch
        norm in inference mode, as in the shipped model) -> `head`. Its layers are the base's and the head's
        own objects: training it trains the shipped model."""
        import keras

        inputs = keras.Input((self.values_per_image,), name="cached_activations")
        parts, start = [], 0
        for index, shape in enumerate(self.shapes):
            size = math.prod(shape)
            part = keras.layers.Reshape(shape, name=f"cached_{index}")(inputs[:, start : start + size])
            parts.append(part)
            start += size
        x = parts[0] if self.top is None else self.top(parts if len(parts) > 1 else parts[0], training=False)
        return keras.Model(inputs, head(x), name="cached_top")


def find_cut(base: Any, unfrozen: int) -> Cut | None:
    """The cut below the top `unfrozen` layers of base.layers (unfreeze_top's count); None where it is at
    the base's input, so that nothing below it could be cached."""
    import keras

    first = len(base.layers) - unfrozen
    tensors = crossing_tensors(base, first)
    inputs = {id(x) for x in base.inputs}
    if all(id(x) in inputs for x in tensors):
        return None
    flat = [keras.layers.Flatten(name=f"cut_{i}_flat")(x) for i, x in enumerate(tensors)]
    joined = flat[0] if len(flat) == 1 else keras.layers.Concatenate(name="cut_concat")(flat)
    bottom = keras.Model(base.inputs, joined, name=f"{base.name}_bottom")
    at_output = [id(x) for x in tensors] == [id(x) for x in base.outputs]
    # A model from intermediate tensors gets its own inputs, wired to the same layer objects (Keras clones
    # only the graph's nodes), so the top shares every weight with the base.
    top = None if at_output else keras.Model(tensors if len(tensors) > 1 else tensors[0], base.outputs[0])
    layers = tuple(x._keras_history.operation.name for x in tensors)
    shapes = tuple(tuple(int(d) for d in x.shape[1:]) for x in tensors)
    return Cut(bottom, top, layers, shapes)


@dataclass(frozen=True)
class CachePlan:
    """What fine-tuning caches, or why it caches nothing; `views` 0 means it trains on the images."""

    views: int  # augmented views of each training image in the cache (0: no cache)
    requested: int  # finetune.cached_views
    cut: Cut | None
    n_train: int
    n_val: int
    bound_bytes: int
    reason: str  # one line: what is cached, or why nothing is

    @property
    def bytes(self) -> int:
        """What the cache takes in memory (0 without one)."""
        if not self.views or self.cut is None:
            return 0
        return cache_bytes(self.cut, self.views, self.n_train, self.n_val)

    def metrics(self) -> dict[str, int]:
        """The keys metrics/finetune/metrics.json gets."""
        return {"cached_views": self.views, "cache_bytes": self.bytes, "cache_bound_bytes": self.bound_bytes}


def cache_bytes(cut: Cut, views: int, n_train: int, n_val: int) -> int:
    return 4 * cut.values_per_image * (views * n_train + n_val)  # float32


def plan_cache(cut: Cut | None, requested: int, epochs: int, n_train: int, n_val: int, bound_bytes: int) -> CachePlan:
    """Whether to cache, and how many views: finetune.cached_views, but no more than the epochs (each epoch
    uses one view); none where the cut is at the input, or where the cache would exceed `bound_bytes`."""

    def plan(views: int, reason: str) -> CachePlan:
        return CachePlan(views, requested, cut, n_train, n_val, bound_bytes, reason)

    if requested == 0:
        return plan(0, "finetune.cached_views is 0: every epoch runs the whole model on the images")
    if cut is None:
        return plan(
            0,
            "every layer of the base is unfrozen (finetune.unfreeze), so nothing below the trained layers could "
            "be cached: every epoch runs the whole model on the images",
        )
    views = max(1, min(requested, epochs))
    size = cache_bytes(cut, views, n_train, n_val)
    if size > bound_bytes:
        return plan(
            0,
            f"finetune.cached_views: {views} views of {n_train} training images and {n_val} validation images "
            f"would take {gigabytes(size)}, over the cache's bound of {gigabytes(bound_bytes)} "
            f"({CACHE_MEMORY_FRACTION:.0%} of this machine's memory): fine-tuning on the images instead; "
            "lower finetune.cached_views, or unfreeze fewer layers (finetune.unfreeze), to cache",
        )
    capped = f" (finetune.cached_views {requested}, but only {epochs} epochs)" if views < requested else ""
    return plan(
        views,
        f"caching {views} augmented view{'s' if views > 1 else ''} of {n_train} training images{capped} and "
        f"{n_val} validation images at the cut below the unfrozen layers, where {cut.describe()}; "
        f"{megabytes(size)} in memory, within its bound of {gigabytes(bound_bytes)} "
        f"({CACHE_MEMORY_FRACTION:.0%} of this machine's memory)",
    )


def model_front(model: Any, base: Any) -> tuple[Any, Any | None, list[Any]]:
    """The shipped model's layers before the base, as ship_model builds them: (the resizing, the
    augmentation or None, the preprocessing layers in order)."""
    layers = model.layers[1 : model.layers.index(base)]
    augmentation = next((layer for layer in layers if layer.name == AUGMENTATION_LAYER), None)
    rest = [layer for layer in layers if layer is not augmentation]
    return rest[0], augmentation, rest[1:]


@dataclass(frozen=True)
class FrozenPart:
    """The shipped model up to the cut, in two compiled pieces: `pixels` resizes (and augments, with
    `augmented`), `bottom` preprocesses and runs the base up to the cut. Together they compute what the
    shipped model computes up to the cut."""

    pixels: Callable[[Any, bool], Any]  # (resized images, augmented) -> images as the base's preprocessing takes them
    bottom: Callable[[Any], Any]  # images -> the cut's flattened activations

    def __call__(self, images: Any, augmented: bool) -> np.ndarray:
        return np.asarray(self.bottom(self.pixels(images, augmented)))


def frozen_part(model: Any, base: Any, cut: Cut, n_images: int) -> FrozenPart:
    """The shipped model's frozen part up to `cut`, for `n_images` images.

    `bottom` is compiled for inference with its weights as constants where that pays (tlpipe.models); the
    augmentation stays outside it, in a function that reads its random state at every call, so that each
    call draws anew.
    """
    import tensorflow as tf

    resize, augmentation, preprocessing = model_front(model, base)
    size = base.input_shape[1]
    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    resized = tf.function(lambda images: resize(images), input_signature=[spec], autograph=False)
    augmented = resized
    if augmentation is not None:
        augmented = tf.function(
            lambda images: augmentation(resize(images), training=True), input_signature=[spec], autograph=False
        )

    def bottom(images: Any) -> Any:
        x = images
        for layer in preprocessing:
            x = layer(x)
        return cut.bottom(x, training=False)

    return FrozenPart(
        pixels=lambda images, augment: (augmented if augment else resized)(images),
        bottom=inference_function(bottom, (None, size, size, 3), freeze=worth_freezing(n_images)),
    )


@dataclass(frozen=True)
class ActivationCache:
    train: np.ndarray  # (views, training images, values per image), float32
    val: np.ndarray  # (validation images, values per image), float32
    seconds: float  # to build it


def build_cache(frozen: FrozenPart, plan: CachePlan, train_images: Any, val_images: Any, key: str) -> ActivationCache:
    """Run the frozen part once over `plan.views` augmented views of every image of `train_images` and once
    over `val_images` unaugmented (batched datasets of (resized images, labels), in their order). Early on,
    it prints how long the whole cache should take, from the batches it has timed.

    The views come from the shipped model's own augmentation layers, whose random draws ship_model's seed
    fixes: the same seed and images give the same cache.
    """
    if plan.cut is None or not plan.views:
        raise ValueError("build_cache needs a plan that caches")
    started = time.perf_counter()
    width = plan.cut.values_per_image
    train = np.empty((plan.views, plan.n_train, width), np.float32)
    val = np.empty((plan.n_val, width), np.float32)
    parts = [(train[view], train_images, True) for view in range(plan.views)] + [(val, val_images, False)]
    total = plan.views * plan.n_train + plan.n_val
    estimate = CacheEstimate(key, total)
    with bar(total, f"{key}: caching activations") as progress:
        for out, images, augmented in parts:
            start = 0
            for batch, _ in images:
                activations = frozen(batch, augmented)
                out[start : start + len(activations)] = activations
                start += len(activations)
                progress.update(len(activations))
                estimate.update(len(activations))
            if start != len(out):
                raise ValueError(f"the images gave {start} rows of activations, the cache has {len(out)}")
    return ActivationCache(train, val, time.perf_counter() - started)


class CacheEstimate:
    """Prints, once, how long building the cache should take: timed over the batches after the first (which
    also traces the functions), as fit_progress times the first epoch."""

    def __init__(self, key: str, total: int) -> None:
        self.key, self.total = key, total
        self.batches, self.done, self.since, self.counted = 0, 0, 0.0, 0

    def update(self, images: int) -> None:
        self.batches += 1
        self.done += images
        if self.batches == 1:
            self.since = time.perf_counter()
        elif self.batches <= TIMED_BATCHES:
            self.counted += images
            if self.batches == TIMED_BATCHES and self.done < self.total:
                per_image = (time.perf_counter() - self.since) / self.counted
                print(
                    f"{self.key}: measured {1 / per_image:.0f} images/s through the frozen part: about "
                    f"{duration(per_image * self.total)} for the cache's {self.total} images",
                    file=sys.stderr,
                    flush=True,
                )


def cached_batches(x: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> Any:
    """Batches of (activations, labels) for Keras' fit and evaluate, without copying the cache: `x` is
    (views, images, values) or (images, values). Epoch e reads view e mod views; with `shuffle_seed` its
    images come in a new order every epoch, the same on every run."""
    import keras

    views = x if x.ndim == 3 else x[np.newaxis]

    class CachedBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = -1  # on_epoch_begin, which Keras calls before each epoch's first batch, makes it 0
            self.order = np.arange(views.shape[1])

        def __len__(self) -> int:
            return math.ceil(views.shape[1] / batch_size)

        def on_epoch_begin(self) -> None:
            self.epoch += 1
            if shuffle_seed is not None:
                self.order = np.random.default_rng([shuffle_seed, self.epoch]).permutation(views.shape[1])

        @property
        def view(self) -> int:
            return max(self.epoch, 0) % len(views)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            rows = self.order[index * batch_size : (index + 1) * batch_size]
            return views[self.view, rows], labels[rows]

    return CachedBatches()


def cached_training(
    key: str,
    shipped: tuple[Any, Any, Any],
    plan: CachePlan,
    images: tuple[Any, Any],
    labels: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    seed: int,
    strategy: Any,
) -> Training:
    """Build the cache (saying early on how long that should take) and return what fine_tune trains on it.

    `shipped` is (model, base, head) as ship_model built them; `images` the (train, val) batches of resized
    images and labels in the manifest's order; `labels` their class indices.
    """
    model, base, head = shipped
    if plan.cut is None or not plan.views:
        raise ValueError("cached_training needs a plan that caches")
    frozen = frozen_part(model, base, plan.cut, plan.views * plan.n_train + plan.n_val)
    cache = build_cache(frozen, plan, images[0], images[1], key)
    print(f"{key}: activations cached in {duration(cache.seconds)}", file=sys.stderr, flush=True)
    with strategy.scope():
        top = plan.cut.training_model(head)
    return Training(
        top,
        cached_batches(cache.train, labels[0], batch_size, shuffle_seed=seed),
        cached_batches(cache.val, labels[1], batch_size),
        batch_forward(top, (plan.cut.values_per_image,)),
        what="the unfrozen top's forward pass on cached activations",
    )


def training_on(
    key: str,
    shipped: tuple[Any, Any, Any],
    plan: CachePlan,
    splits: tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]],
    image_size: int,
    batch_size: int,
    seed: int,
    strategy: Any,
) -> Training:
    """What fine_tune trains, as the finetune stage sets it up: the top of the base and the head on cached
    activations where `plan` caches (cached_training), the shipped model on the images, reshuffled every
    epoch (seeded), where it does not.

    `shipped` is (model, base, head) as ship_model built them; `splits` the (train, val) image paths and
    class indices, in the manifest's order.
    """
    (train_paths, y_train), (val_paths, y_val) = splits
    val_data = image_dataset(val_paths, image_size, batch_size, y_val)
    if plan.views:
        train_images = image_dataset(train_paths, image_size, batch_size, y_train)
        return cached_training(
            key, shipped, plan, (train_images, val_data), (y_train, y_val), batch_size, seed, strategy
        )
    model = shipped[0]
    train_data = image_dataset(train_paths, image_size, batch_size, y_train, shuffle_seed=seed)
    return Training(model, train_data, val_data, batch_forward(model, (image_size, image_size, 3)))
