"""Stage train@<backbone>: fit the classification head on the cached features (params.yaml `train.head`).

`logistic`: a linear probe whose regularisation is chosen by cross-validation; `keras`: the Keras head with
early stopping on the validation split. Where validation is too small to decide anything
(`train.min_val_per_class`), the head is fitted on train + val instead: the Keras head for the median
number of epochs that crossval@<backbone>'s folds kept (tlpipe.small_data).

The head goes to models/<backbone>/; its training log (epochs, or the probe's regularisation path) to
metrics/train/<backbone>/ through dvclive, and its picture to reports/training/<backbone>.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe import pictures
from tlpipe.datasets import read_classes
from tlpipe.errors import stage_main
from tlpipe.feature_cache import load_features, training_arrays
from tlpipe.files import atomic_dir, read_json
from tlpipe.models import PROBE_CS, Probe, best_epoch, fit_probe, save_model, train_head
from tlpipe.params import load_params
from tlpipe.paths import crossval_metrics, head_model, train_log_dir, training_picture
from tlpipe.progress import dvclive_callback, dvclive_logger
from tlpipe.runtime import configure_devices, seed_everything, strategy_for, strategy_line
from tlpipe.small_data import small_validation_reason, validation_decides


@dataclass(frozen=True)
class Fit:
    x: np.ndarray
    y: np.ndarray
    val: tuple[np.ndarray, np.ndarray] | None  # early stopping's split; None: train for `epochs`
    epochs: int | None
    on: str  # what the head is fitted on, and why, for the log


def what_to_fit(key: str, features: dict[str, np.ndarray], n_classes: int, settings: dict) -> Fit:
    """Train (with val held out) where validation decides; else train + val, the Keras head for the epochs
    cross-validation kept (early stopping on the small val split where it kept none)."""
    x, y = training_arrays(features)
    val = (features["x_val"], features["y_val"])
    if validation_decides(val[1], n_classes, settings["min_val_per_class"]):
        return Fit(x, y, val, None, "train")
    reason = small_validation_reason(val[1], n_classes, settings["min_val_per_class"])
    x_all, y_all = np.concatenate([x, val[0].astype(np.float32)]), np.concatenate([y, val[1]])
    if settings["head"] == "logistic":
        return Fit(x_all, y_all, None, None, f"train + val, because {reason}")
    epochs = read_json(crossval_metrics(key)).get("best_epoch_median")
    if epochs is None:
        return Fit(x, y, val, None, f"train, early stopping on val although {reason}: crossval@{key} kept no epochs")
    return Fit(
        x_all,
        y_all,
        None,
        epochs,
        f"train + val, because {reason}, for {epochs} epochs (the median crossval@{key} kept)",
    )


@stage_main
def main(key: str) -> None:
    params = load_params()
    settings = params["train"]
    configure_devices(params["distribute"])
    seed_everything(params["seed"])
    n_classes = len(read_classes())
    fit = what_to_fit(key, load_features(key), n_classes, settings)
    with atomic_dir(train_log_dir(key)) as log_dir:
        if settings["head"] == "logistic":
            probe = fit_probe(fit.x, fit.y, n_classes, settings["dropout"], settings["class_weight"], params["seed"])
            save_model(probe.head, head_model(key))
            log_path(log_dir, probe)
            title = f"{key}: linear probe on cached features, regularisation chosen by cross-validation"
            pictures.regularisation_path(list(PROBE_CS), probe.cv_losses, probe.c, title, training_picture(key))
            print(f"{key}: {probe.line(len(fit.y))}; fitted on {fit.on}", file=sys.stderr)
            return
        strategy = strategy_for(params["distribute"])
        if line := strategy_line(params["distribute"], strategy):
            print(f"{key}: {line}", file=sys.stderr)
        head, history = train_head(
            (fit.x, fit.y),
            fit.val,
            n_classes,
            settings,
            params["seed"],
            strategy,
            [dvclive_callback(log_dir)],
            fit.epochs,
        )
        save_model(head, head_model(key))
    pictures.training_curves(history, f"{key}: head on cached features", training_picture(key))
    print(f"{key}: {best_epoch(history)}; fitted on {fit.on}", file=sys.stderr)


def log_path(log_dir: Path, probe: Probe) -> None:
    """The probe's cross-validated log loss at each C, one dvclive step per C (step 0 the smallest); without
    cross-validation, the one C used."""
    logger = dvclive_logger(log_dir)
    for c, loss in zip(PROBE_CS, probe.cv_losses):
        logger.log_metric("C", float(c))
        logger.log_metric("cv_log_loss", float(loss))
        logger.next_step()
    if not probe.cv_losses:
        logger.log_metric("C", probe.c)
        logger.next_step()
    logger.end()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.train BACKBONE_KEY")
    main(sys.argv[1])
