"""Stage finetune: fine-tune the chosen backbone (`model` in params.yaml) end to end and ship it.

Starts from the frozen ImageNet base and the head that train@<model> fitted on cached features, unfreezes
the top of the base (batch-norm layers stay frozen and in inference mode), and trains on the images with
augmentation at a low learning rate. It writes models/finetuned.keras, which the `ship` stage then puts in
place as models/model.keras; the model takes raw RGB images of any size: resizing, augmentation (inactive
at inference) and the backbone's preprocessing are layers inside it.
"""

from __future__ import annotations

import sys

from tlpipe import pictures
from tlpipe.datasets import image_dataset, read_classes, read_manifest, split_rows
from tlpipe.errors import stage_main
from tlpipe.files import atomic_dir, write_json
from tlpipe.finetuning import announce_estimate, forward_seconds_per_image, ship_model, unfreeze_top
from tlpipe.models import class_weights, load_model, loss_for, save_model
from tlpipe.params import load_params
from tlpipe.paths import (
    FINETUNE_LOG_DIR,
    FINETUNED_LABELS,
    FINETUNED_MODEL,
    SHIPPED_NAME,
    head_model,
    training_picture,
)
from tlpipe.progress import fit_progress
from tlpipe.runtime import configure_devices, seed_everything, strategy_for


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
        head = load_model(head_model(key))
        model, base = ship_model(key, spec, head, tune["augment"], seed)
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
    with atomic_dir(FINETUNE_LOG_DIR) as log_dir:
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
            history.history, f"fine-tuning {key}", training_picture(SHIPPED_NAME), best_epoch=best_epoch
        )
        write_json(FINETUNED_LABELS, {"backbone": key, "arch": spec["arch"], "image_size": size, "classes": classes})


if __name__ == "__main__":
    main()
