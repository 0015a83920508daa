"""Stage train@<backbone>: train the classification head on the cached features, with early stopping.

Per-epoch metrics go to metrics/train/<backbone>/ through dvclive; the head goes to models/<backbone>/.
"""

from __future__ import annotations

import sys

from tlpipe import pictures
from tlpipe.datasets import read_classes
from tlpipe.errors import stage_main
from tlpipe.feature_cache import load_features, training_arrays
from tlpipe.files import atomic_dir
from tlpipe.models import best_epoch, save_model, train_head
from tlpipe.params import load_params
from tlpipe.paths import head_model, train_log_dir, training_picture
from tlpipe.progress import dvclive_callback
from tlpipe.runtime import configure_devices, seed_everything, strategy_for, strategy_line


@stage_main
def main(key: str) -> None:
    params = load_params()
    configure_devices(params["distribute"])
    seed_everything(params["seed"])
    classes = read_classes()
    features = load_features(key)
    strategy = strategy_for(params["distribute"])
    if line := strategy_line(params["distribute"], strategy):
        print(f"{key}: {line}", file=sys.stderr)

    with atomic_dir(train_log_dir(key)) as log_dir:
        head, history = train_head(
            training_arrays(features),
            (features["x_val"], features["y_val"]),
            len(classes),
            params["train"],
            params["seed"],
            strategy,
            [dvclive_callback(log_dir)],
        )
        save_model(head, head_model(key))
    pictures.training_curves(history, f"{key}: head on cached features", training_picture(key))
    print(f"{key}: {best_epoch(history)}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.train BACKBONE_KEY")
    main(sys.argv[1])
