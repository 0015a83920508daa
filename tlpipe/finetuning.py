"""Fine-tuning a frozen base and its trained head end to end: the model to ship, and what it will cost."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlpipe.backbones import build_base, get_backbone, preprocessing_layers
from tlpipe.datasets import augmentation_layers
from tlpipe.errors import PipelineError
from tlpipe.models import class_weights, inference_function, loss_for
from tlpipe.params import resolve_weights
from tlpipe.progress import duration
from tlpipe.scoring import class_probabilities

# A training step runs the forward pass, then the backward pass through the unfrozen layers, which costs
# up to twice the forward pass: an estimate before training starts, refined by the measured first batches.
STEP_COST_IN_FORWARD_PASSES = 3.0


def unfreeze_top(base: Any, unfreeze: int | str) -> int:
    """Make the top of `base` trainable: the last `unfreeze` layers, or every layer from the first whose
    name starts with `unfreeze` (a block name such as `block5` or `top`). Returns the number unfrozen."""
    import keras

    layers = base.layers
    if isinstance(unfreeze, str):
        starts = [i for i, layer in enumerate(layers) if layer.name.startswith(unfreeze)]
        if not starts:
            blocks = sorted({layer.name.split("_")[0] for layer in layers})
            raise PipelineError(
                f"finetune.unfreeze: no layer of {base.name} starts with {unfreeze!r}; "
                f"use a layer count or one of: {', '.join(blocks[:40])}"
            )
        first = starts[0]
    else:
        first = max(0, len(layers) - unfreeze)
    base.trainable = True
    for index, layer in enumerate(layers):
        # Batch-norm statistics fitted on ImageNet would be wrecked by small batches of a new dataset.
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return len(layers) - first


def ship_model(key: str, spec: dict[str, Any], head: Any, augment: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """(model, base): raw RGB pixels of any size -> class probabilities."""
    import keras

    backbone = get_backbone(spec["arch"])
    base = build_base(spec["arch"], spec["image_size"], resolve_weights(spec["weights"], backbone.named_weights), seed)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(spec["image_size"], spec["image_size"], name="resize")(inputs)
    x = augmentation_layers(augment, seed)(x)
    for layer in preprocessing_layers(backbone.preprocessing):
        x = layer(x)
    x = base(x, training=False)  # training=False keeps batch norm in inference mode even when unfrozen
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{key}_classifier"), base


def batch_forward(model: Any, image_shape: tuple[int, ...]) -> Callable[[Any], np.ndarray]:
    """The model's inference pass over a batch of images -> class probabilities, compiled once for every
    batch size: one trace serves the time estimate before fine-tuning and the calibration pass after it.

    It reads the model's variables at each call (not frozen), so it sees the weights fine-tuning keeps.
    """
    forward = inference_function(lambda x: model(x, training=False), (None, *image_shape), freeze=False)
    return lambda images: class_probabilities(forward(images).numpy())


def dataset_probabilities(forward: Callable[[Any], np.ndarray], data: Any) -> np.ndarray:
    """Class probabilities of every image of a batched (images, labels) dataset, in its order."""
    return np.concatenate([forward(images) for images, _ in data])


def forward_seconds_per_image(forward: Callable[[Any], np.ndarray], images: Any) -> float:
    """Wall-clock seconds of one inference forward pass per image, measured on one batch after a warm-up."""
    forward(images)
    started = time.perf_counter()
    forward(images)
    return (time.perf_counter() - started) / len(images)


def announce_estimate(
    key: str, per_image_s: float, n_train: int, n_val: int, epochs: int, what: str = "forward pass"
) -> None:
    """Before a long run: how long it will take, and which parameters make it shorter."""
    epoch_s = per_image_s * (STEP_COST_IN_FORWARD_PASSES * n_train + n_val)
    print(
        f"{key}: fine-tuning {epochs} epochs of {n_train} images should take about {duration(epochs * epoch_s)} "
        f"({duration(epoch_s)} per epoch; {what} measured here at {1 / per_image_s:.0f} images/s; "
        "early stopping may end it sooner). To shorten it: lower finetune.epochs or finetune.unfreeze, "
        "choose a lighter backbone (model), or use a GPU.",
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class Training:
    """What fine_tune trains, and on what: the shipped model on batches of images, or the top of the base
    and the head on batches of cached activations (tlpipe.activation_cache). Either way the shipped model's
    layers are the ones trained."""

    model: Any
    train: Any  # batches of (inputs, labels), reshuffled every epoch
    val: Any  # batches of (inputs, labels), in the manifest's order
    forward: Callable[[Any], np.ndarray]  # batch_forward of `model`: a batch of val's inputs -> probabilities
    what: str = "forward pass"  # what `forward` is, in the time estimate

    def val_probabilities(self) -> np.ndarray:
        """The class probabilities of every validation image, in the manifest's order."""
        return dataset_probabilities(self.forward, self.val)


@dataclass(frozen=True)
class FineTuned:
    history: dict[str, list[float]]
    frozen: tuple[float, float]  # validation (loss, accuracy) before fine-tuning
    tuned: tuple[float, float]  # ... and of the weights kept
    best_epoch: int | None  # None: the epoch early stopping restored; 0: the frozen weights were kept
    rejected: tuple[float, float] | None = None  # where the frozen weights were kept: the fine-tuned ones'

    def summary(self, key: str, unfrozen: int) -> str:
        return (
            f"{key}: {unfrozen} layers unfrozen; validation loss {self.frozen[0]:.4f} -> {self.tuned[0]:.4f}, "
            f"accuracy {self.frozen[1]:.4f} -> {self.tuned[1]:.4f}"
        )

    @property
    def shipped(self) -> bool:
        """Whether the fine-tuned weights ship (else the frozen base and head do)."""
        return self.rejected is None

    def reason(self) -> str:
        """Why what ships ships, in the held-out evidence's words."""
        if self.rejected is not None:
            return (
                f"fine-tuning raised the validation loss from {self.frozen[0]:.4g} to {self.rejected[0]:.4g}: "
                "the frozen base and head ship"
            )
        return f"fine-tuning lowered the validation loss from {self.frozen[0]:.4g} to {self.tuned[0]:.4g}"


def fine_tune(
    key: str,
    training: Training,
    strategy: Any,
    train_labels: np.ndarray,
    n_val: int,
    n_classes: int,
    settings: dict[str, Any],
    class_weight: str | None,
    callbacks: list[Any],
) -> FineTuned:
    """Train `training.model` (params.yaml `finetune:`) on its (train, val) batches with early stopping on val.

    Prints an estimate of the time it will take first, timing `training.forward`.
    Fine-tuning must never ship something worse than the frozen base and head it started from: when the
    validation loss ends higher, the frozen weights are kept.
    """
    import keras

    model, train_data, val_data = training.model, training.train, training.val
    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=settings["learning_rate"]),
            loss=loss_for(n_classes),
            metrics=["accuracy"],
        )
    frozen_weights = model.get_weights()
    sample, _ = next(iter(val_data))
    per_image_s = forward_seconds_per_image(training.forward, sample)
    announce_estimate(key, per_image_s, len(train_labels), n_val, settings["epochs"], training.what)
    frozen = tuple(model.evaluate(val_data, verbose=0))
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=settings["epochs"],
        class_weight=class_weights(train_labels, n_classes, class_weight),
        shuffle=False,  # the data reshuffles itself every epoch (seeded); Keras warns if asked to
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings["patience"], restore_best_weights=True),
            *callbacks,
        ],
    )
    tuned = tuple(model.evaluate(val_data, verbose=0))
    if tuned[0] > frozen[0]:
        model.set_weights(frozen_weights)
        return FineTuned(history.history, frozen, frozen, best_epoch=0, rejected=tuned)
    return FineTuned(history.history, frozen, tuned, best_epoch=None)
