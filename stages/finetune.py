"""Stage finetune: fine-tune the chosen backbone (`model` in params.yaml) end to end and ship it.

Starts from the frozen ImageNet base and the head that train@<model> fitted on cached features, unfreezes
the top of the base (batch-norm layers stay frozen and in inference mode), and trains on the images with
augmentation at a low learning rate. It writes models/finetuned.keras, which the `ship` stage then puts in
place as models/model.keras; the model takes raw RGB images of any size: resizing, augmentation (inactive
at inference) and the backbone's preprocessing are layers inside it.
"""
from __future__ import annotations

import sys
import time
from typing import Any

from stages import pictures
from stages.backbones import build_base, get_backbone, preprocessing_layers
from stages.common import (
    FINETUNED_LABELS, FINETUNED_MODEL, METRICS_DIR, MODELS_DIR, TRAINING_PICTURES_DIR, PipelineError, atomic_dir,
    seed_everything, stage_main, write_json,
)
from stages.datasets import augmentation_layers, image_dataset, read_classes, read_manifest, split_rows
from stages.distribute import configure_devices, strategy_for
from stages.models import class_weights, load_model, loss_for, save_model
from stages.params import load_params, resolve_weights
from stages.progress import duration, fit_progress

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


def forward_seconds_per_image(model: Any, images: Any) -> float:
    """Wall-clock seconds of one inference forward pass per image, measured on one batch after a warm-up."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    forward(images)
    started = time.perf_counter()
    forward(images).numpy()
    return (time.perf_counter() - started) / len(images)


def announce_estimate(key: str, per_image_s: float, n_train: int, n_val: int, epochs: int) -> None:
    """Before a long run: how long it will take, and which parameters make it shorter."""
    epoch_s = per_image_s * (STEP_COST_IN_FORWARD_PASSES * n_train + n_val)
    print(
        f"{key}: fine-tuning {epochs} epochs of {n_train} images should take about {duration(epochs * epoch_s)} "
        f"({duration(epoch_s)} per epoch; forward pass measured here at {1 / per_image_s:.0f} images/s; "
        "early stopping may end it sooner). To shorten it: lower finetune.epochs or finetune.unfreeze, "
        "choose a lighter backbone (model), or use a GPU.",
        file=sys.stderr,
        flush=True,
    )


@stage_main
def main() -> None:
    params = load_params()
    key, tune, seed = params["model"], params["finetune"], params["seed"]
    spec = params["backbones"][key]
    configure_devices(params["distribute"])
    seed_everything(seed)
    import keras
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    classes = read_classes()
    manifest = read_manifest()
    strategy = strategy_for(params["distribute"])
    with strategy.scope():
        head = load_model(MODELS_DIR / key / "head.keras")
        model, base = ship_model(key, spec, head, params["augment"], seed)
        unfrozen = unfreeze_top(base, tune["unfreeze"])

    size, batch_size = spec["image_size"], tune["batch_size"]
    train_rows, val_rows = split_rows(manifest, "train"), split_rows(manifest, "val")
    train_data = image_dataset(
        list(train_rows["path"]), size, batch_size, train_rows["label_index"].to_numpy(), shuffle_seed=seed
    )
    val_data = image_dataset(list(val_rows["path"]), size, batch_size, val_rows["label_index"].to_numpy())

    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=tune["learning_rate"]),
            loss=loss_for(len(classes)),
            metrics=["accuracy"],
        )
    frozen_weights = model.get_weights()
    sample, _ = next(iter(val_data))
    announce_estimate(key, forward_seconds_per_image(model, sample), len(train_rows), len(val_rows), tune["epochs"])
    frozen_loss, frozen_accuracy = model.evaluate(val_data, verbose=0)
    with atomic_dir(METRICS_DIR / "finetune") as log_dir:
        live = Live(str(log_dir), dvcyaml=None, save_dvc_exp=False)
        history = model.fit(
            train_data,
            validation_data=val_data,
            epochs=tune["epochs"],
            class_weight=class_weights(
                train_rows["label_index"].to_numpy(), len(classes), params["train"]["class_weight"]
            ),
            shuffle=False,  # the dataset reshuffles itself every epoch (seeded); Keras warns if asked to
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=tune["patience"], restore_best_weights=True),
                DVCLiveCallback(live=live),
                fit_progress(key, -(-len(train_rows) // batch_size), tune["epochs"]),
            ],
        )
        tuned_loss, tuned_accuracy = model.evaluate(val_data, verbose=0)
        best_epoch = None  # the curves mark the epoch early stopping restored
        if tuned_loss > frozen_loss:
            # Fine-tuning must never ship something worse than the frozen base and head it started from.
            model.set_weights(frozen_weights)
            tuned_loss, tuned_accuracy = frozen_loss, frozen_accuracy
            best_epoch = 0
        print(
            f"{key}: {unfrozen} layers unfrozen; validation loss {frozen_loss:.4f} -> {tuned_loss:.4f}, "
            f"accuracy {frozen_accuracy:.4f} -> {tuned_accuracy:.4f}",
            file=sys.stderr,
        )
        save_model(model, FINETUNED_MODEL)
        pictures.training_curves(
            history.history, f"fine-tuning {key}", TRAINING_PICTURES_DIR / "model.png", best_epoch=best_epoch
        )
        write_json(FINETUNED_LABELS, {"backbone": key, "arch": spec["arch"], "image_size": size, "classes": classes})


if __name__ == "__main__":
    main()
