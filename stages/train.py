"""Stage train@<backbone>: train the classification head on the cached features, with early stopping.

Per-epoch metrics go to metrics/train/<backbone>/ through dvclive; the head goes to models/<backbone>/.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from tlpipe import pictures
from tlpipe.datasets import array_batches, read_classes
from tlpipe.errors import stage_main
from tlpipe.feature_cache import load_features, training_arrays
from tlpipe.files import atomic_dir
from tlpipe.models import build_head, class_weights, loss_for, save_model
from tlpipe.params import load_params
from tlpipe.paths import head_model, train_log_dir, training_picture
from tlpipe.runtime import configure_devices, seed_everything, strategy_for


@stage_main
def main(key: str) -> None:
    params = load_params()
    train = params["train"]
    configure_devices(params["distribute"])
    seed_everything(params["seed"])
    import keras
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    classes = read_classes()
    features = load_features(key)
    x_train, y_train = training_arrays(features)
    validation = array_batches(features["x_val"].astype(np.float32), features["y_val"], train["batch_size"])

    strategy = strategy_for(params["distribute"])
    if params["distribute"]["strategy"] != "none":
        print(
            f"{key}: training under {params['distribute']['strategy']} on {strategy.num_replicas_in_sync} replicas",
            file=sys.stderr,
        )
    with strategy.scope():
        head = build_head(x_train, len(classes), train["dropout"], train["hidden_units"])
        head.compile(
            optimizer=keras.optimizers.Adam(learning_rate=train["learning_rate"]),
            loss=loss_for(len(classes)),
            metrics=["accuracy"],
            # A whole epoch per call: the head is so small that per-step Python overhead dominates otherwise.
            steps_per_execution=math.ceil(len(x_train) / train["batch_size"]),
        )
    with atomic_dir(train_log_dir(key)) as log_dir:
        # dvcyaml=None: the pipeline's dvc.yaml already declares these plots; dvclive must not rewrite it.
        live = Live(str(log_dir), dvcyaml=None, save_dvc_exp=False)
        history = head.fit(
            array_batches(x_train, y_train, train["batch_size"], shuffle_seed=params["seed"]),
            validation_data=validation,
            epochs=train["epochs"],
            class_weight=class_weights(y_train, len(classes), train["class_weight"]),
            shuffle=False,  # the dataset reshuffles itself every epoch (seeded); Keras warns if asked to
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=train["patience"], restore_best_weights=True
                ),
                DVCLiveCallback(live=live),
            ],
        )
        save_model(head, head_model(key))
    pictures.training_curves(history.history, f"{key}: head on cached features", training_picture(key))
    best = int(np.argmin(history.history["val_loss"]))
    print(
        f"{key}: {len(history.history['loss'])} epochs, best epoch {best + 1}: "
        f"val_loss {history.history['val_loss'][best]:.4f}, val_accuracy {history.history['val_accuracy'][best]:.4f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.train BACKBONE_KEY")
    main(sys.argv[1])
