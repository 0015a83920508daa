"""Stage finetune: fine-tune the chosen backbone (`model` in params.yaml) end to end and ship it.

Starts from the frozen ImageNet base and the head that train@<model> fitted on cached features, unfreezes
the top of the base (batch-norm layers stay frozen and in inference mode), and trains on the images with
augmentation at a low learning rate. With `finetune.cached_views` (tlpipe.activation_cache) the frozen part
below the unfrozen layers runs once, over that many augmented views of each training image and over the
validation images, and each epoch trains the unfrozen layers and the head on those activations. It writes
models/finetuned.keras, which the `ship` stage then puts in
place as models/model.keras; the model takes raw RGB images of any size: resizing, augmentation (inactive
at inference) and the backbone's preprocessing are layers inside it.

Fine-tuning ships only where held-out evidence says it is not worse than the frozen head: the validation
loss must not rise. Where validation is too small to say (tlpipe.small_data), no fine-tuning is run, and the
frozen base and head ship as the same self-contained model. models/finetuned.labels.json says which shipped
and why (`fine_tuned`, `shipped_reason`), and evaluate_model puts it into metrics/model.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tlpipe import pictures
from tlpipe.activation_cache import cache_bound_bytes, find_cut, plan_cache, training_on
from tlpipe.datasets import read_classes, read_manifest, split_rows
from tlpipe.errors import stage_main
from tlpipe.evaluation import held_out_calibration, temperature_reason
from tlpipe.files import atomic_dir, read_json, write_json
from tlpipe.finetuning import fine_tune, ship_model, unfreeze_top
from tlpipe.models import load_model, save_model
from tlpipe.params import load_params
from tlpipe.paths import FINETUNE_LOG_DIR, FINETUNED_LABELS, FINETUNED_MODEL, SHIPPED_NAME, head_model, training_picture
from tlpipe.progress import dvclive_callback, dvclive_logger, fit_progress
from tlpipe.runtime import configure_devices, seed_everything, strategy_for
from tlpipe.small_data import small_validation_reason, validation_decides


@stage_main
def main() -> None:
    params = load_params()
    key, tune, seed = params["model"], params["finetune"], params["seed"]
    spec = params["backbones"][key]
    configure_devices(params["distribute"])
    seed_everything(seed)
    classes = read_classes()
    manifest = read_manifest()
    train_rows, val_rows = split_rows(manifest, "train"), split_rows(manifest, "val")
    y_val = val_rows["label_index"].to_numpy()
    min_val = params["train"]["min_val_per_class"]
    if not validation_decides(y_val, len(classes), min_val):
        reason = (
            f"not fine-tuned: {small_validation_reason(y_val, len(classes), min_val)}, too few to show that "
            "fine-tuning is not worse than the frozen head; the frozen base and head ship"
        )
        scaling = held_out_calibration(key, y_val, None, classes, min_val, params["stats"]["calibration_alpha"])
        ship_frozen(key, spec, tune, seed, classes, reason, scaling)
        return

    strategy = strategy_for(params["distribute"])
    head = load_model(head_model(key))
    with strategy.scope():
        model, base = ship_model(key, spec, head, tune["augment"], seed)
        unfrozen = unfreeze_top(base, tune["unfreeze"])
        cut = find_cut(base, unfrozen)
    train_labels = train_rows["label_index"].to_numpy()
    plan = plan_cache(cut, tune["cached_views"], tune["epochs"], len(train_labels), len(val_rows), cache_bound_bytes())
    print(f"{key}: {plan.reason}", file=sys.stderr)

    size, batch_size = spec["image_size"], tune["batch_size"]
    splits = ((list(train_rows["path"]), train_labels), (list(val_rows["path"]), y_val))
    training = training_on(key, (model, base, head), plan, splits, size, batch_size, seed, strategy)

    with atomic_dir(FINETUNE_LOG_DIR) as log_dir:
        progress = fit_progress(key, -(-len(train_rows) // batch_size), tune["epochs"])
        result = fine_tune(
            key,
            training,
            strategy,
            train_labels,
            len(val_rows),
            len(classes),
            tune,
            params["train"]["class_weight"],
            [dvclive_callback(log_dir), progress],
        )
        print(result.summary(key, unfrozen), file=sys.stderr)
        print(f"{key}: {result.reason()}", file=sys.stderr)
        save_model(model, FINETUNED_MODEL)
        write_json(log_dir / "metrics.json", read_json(log_dir / "metrics.json") | plan.metrics())
        picture = training_picture(SHIPPED_NAME)
        pictures.training_curves(result.history, f"fine-tuning {key}", picture, best_epoch=result.best_epoch)
        # Calibration for predict and evaluate_model: the temperature that best fits the validation images
        # (on the cache, where there is one: the shipped model's probabilities within float error).
        started = time.perf_counter()
        val_probabilities = training.val_probabilities()
        scaling = held_out_calibration(
            key, y_val, val_probabilities, classes, min_val, params["stats"]["calibration_alpha"]
        )
        seconds = time.perf_counter() - started
        print(
            f"{key}: temperature {scaling['temperature']:.3f} ({temperature_reason(scaling)}; "
            f"{len(val_rows)} validation images, {seconds:.1f} s)",
            file=sys.stderr,
        )
        write_labels(key, spec, classes, scaling, result.shipped, result.reason())


def ship_frozen(
    key: str,
    spec: dict[str, Any],
    tune: dict[str, Any],
    seed: int,
    classes: list[str],
    reason: str,
    scaling: dict[str, Any],
) -> None:
    """Write the frozen base and head as the model to ship, with the head's temperature (`scaling`); the
    training log and picture say that nothing was trained, and why."""
    model, _ = ship_model(key, spec, load_model(head_model(key)), tune["augment"], seed)
    with atomic_dir(FINETUNE_LOG_DIR) as log_dir:
        log_nothing_trained(log_dir)
        save_model(model, FINETUNED_MODEL)
        pictures.training_curves({}, f"{key}: {reason}", training_picture(SHIPPED_NAME))
        write_labels(key, spec, classes, scaling, False, reason)
    print(f"{key}: {reason}; temperature {scaling['temperature']:.3f} ({temperature_reason(scaling)})", file=sys.stderr)


def log_nothing_trained(log_dir: Path) -> None:
    """dvclive's files for a run of no epochs: one step saying so (epochs 0)."""
    logger = dvclive_logger(log_dir)
    logger.log_metric("epochs", 0)
    logger.next_step()
    logger.end()


def write_labels(
    key: str, spec: dict[str, Any], classes: list[str], scaling: dict[str, Any], fine_tuned: bool, reason: str
) -> None:
    labels = {"backbone": key, "arch": spec["arch"], "image_size": spec["image_size"], "classes": classes}
    write_json(FINETUNED_LABELS, labels | scaling | {"fine_tuned": fine_tuned, "shipped_reason": reason})


if __name__ == "__main__":
    main()
