"""Stage train@<backbone>: train the classification head on the cached features, with early stopping.

Per-epoch metrics go to metrics/train/<backbone>/ through dvclive; the head goes to models/<backbone>/.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from stages import pictures
from stages.common import (
    FEATURES_DIR, METRICS_DIR, MODELS_DIR, TRAINING_PICTURES_DIR, PipelineError, atomic_dir, seed_everything, stage_main,
)
from stages.datasets import array_batches, read_classes
from stages.distribute import configure_devices, strategy_for
from stages.models import build_head, class_weights, loss_for, save_model
from stages.params import load_params


def load_features(key: str) -> dict[str, np.ndarray]:
    path = FEATURES_DIR / key / "features.npz"
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run dvc repro features@{key}") from None
    except (ValueError, OSError) as error:
        raise PipelineError(f"{path} is unreadable ({error}); run dvc repro -f features@{key}") from None


def training_arrays(features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The original training features followed by their augmented views."""
    x = np.concatenate([features["x_train"], features["x_train_aug"]]).astype(np.float32)
    y = np.concatenate([features["y_train"], features["y_train_aug"]])
    return x, y


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
        print(f"{key}: training under {params['distribute']['strategy']} on {strategy.num_replicas_in_sync} "
              "replicas", file=sys.stderr)
    with strategy.scope():
        head = build_head(x_train, len(classes), train["dropout"], train["hidden_units"])
        head.compile(
            optimizer=keras.optimizers.Adam(learning_rate=train["learning_rate"]),
            loss=loss_for(len(classes)),
            metrics=["accuracy"],
            # A whole epoch per call: the head is so small that per-step Python overhead dominates otherwise.
            steps_per_execution=math.ceil(len(x_train) / train["batch_size"]),
        )
    with atomic_dir(METRICS_DIR / "train" / key) as log_dir:
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
        save_model(head, MODELS_DIR / key / "head.keras")
    pictures.training_curves(history.history, f"{key}: head on cached features", TRAINING_PICTURES_DIR / f"{key}.png")
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
