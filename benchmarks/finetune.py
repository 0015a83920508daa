"""Fine-tuning on cached activations against fine-tuning on the images: `python -m benchmarks.finetune`.

A throwaway project prepares the shared cats_and_dogs_filtered zip (the pipeline's own splits: 1,600 training,
400 validation and 1,000 test images). For each backbone, MobileNetV2 (`finetune.unfreeze: 30`, the default)
and VGG16 (`unfreeze: block5`: 30 layers are all of VGG16), both with the shared ImageNet weights, it fits the
linear probe (the train stage's default head) on the frozen features of --head-images training images, then
fine-tunes that base and head twice in this process, as the finetune stage does (tlpipe.finetuning.fine_tune):
on the images (`finetune.cached_views: 0`) and on cached activations (`cached_views` of params.yaml, or
--views), each from the same start, one after the other, backbone by backbone. Then it times more epochs of
the two in turn (one on the images, one on the cache, ...; --pairs), so that the machine's drift and other
load weigh on both alike. For each way it records:
- the median wall time of an epoch (training and validation) taken in turn, and the ratio of the two; the
  median epoch within each run; the time to build the cache; the total (setup, the cache, fine-tuning and
  the calibration pass over the validation images);
- the test accuracy of the model that would ship, with its 95% interval (Wilson), and McNemar's exact test
  of the cached run against the run on the images, on the same test images;
- the bound set by FLOPs (convolutions and dense layers, benchmarks.benchmark.layer_flops): the frozen
  part's share of the forward pass, and the speed-up per epoch that skipping it allows if a training step
  costs three forward passes of what it trains (tlpipe.finetuning.STEP_COST_IN_FORWARD_PASSES) and
  decoding and augmenting cost nothing.
Other parameters are params.yaml's `finetune:`. VGG16 runs 2 epochs on a seeded subset of each split
(400 training, 200 validation, 500 test images), to keep the whole benchmark within about half an hour on
two CPU cores; --epochs and --images change either backbone's.

Writes benchmarks/finetune.json and its table into docs/performance.md (the `finetune` markers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import (
    PROJECT_ROOT,
    SHARED_WEIGHTS,
    Block,
    benchmark_parser,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from benchmarks.benchmark import layer_flops
from tests.helpers import SHARED_DIR, make_project, run

NAME = "finetune"
PAGES = ("docs/performance.md",)
ZIP = "data/cats_and_dogs_filtered.zip"
# key: (arch, finetune.unfreeze, epochs (None: params.yaml's), images per split (None: all), interleaved
# pairs of timed epochs). VGG16's block5 is its last 3 convolutions; its forward pass costs about 50 times
# MobileNetV2's FLOPs, so on a CPU it runs fewer epochs on a seeded subset of each split.
BACKBONES: dict[str, tuple[str, int | str, int | None, dict[str, int] | None, int]] = {
    "mobilenet": ("MobileNetV2", 30, None, None, 3),
    "vgg16": ("VGG16", "block5", 2, {"train": 400, "val": 200, "test": 500}, 1),
}
CONFIDENCE = 0.95


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--views", type=int, help="finetune.cached_views of the cached runs (default: params.yaml's)")
    parser.add_argument("--head-images", type=int, default=200, help="training images the linear probe is fitted on")
    parser.add_argument(
        "--epochs",
        nargs=2,
        action="append",
        metavar=("KEY", "N"),
        help="epochs for one backbone (mobilenet, vgg16); default params.yaml's for mobilenet, 2 for vgg16",
    )
    parser.add_argument(
        "--images",
        nargs=4,
        action="append",
        metavar=("KEY", "TRAIN", "VAL", "TEST"),
        help="a seeded subset of each split for one backbone; default all for mobilenet, 400 200 500 for vgg16",
    )
    parser.add_argument(
        "--pairs",
        nargs=2,
        action="append",
        metavar=("KEY", "N"),
        help="timed epochs of each way, taken in turn after both runs; default 3 for mobilenet, 1 for vgg16",
    )
    parser.add_argument("--only", nargs="*", help="backbone keys (default: mobilenet and vgg16)")
    return parser


def prepared_project(folder: Path, archive: Path) -> Path:
    """A throwaway project with the shared zip prepared as the pipeline prepares it."""
    project = make_project(folder / "project", {"data": {"url": str(archive)}})
    for stage in ("validate", "fetch", "prepare"):
        run([sys.executable, "-m", f"stages.{stage}"], project)
    return project


def fitted_head(spec: dict[str, Any], paths: list[str], labels: np.ndarray, seed: int) -> Any:
    """The linear probe fitted on the frozen base's features of `paths` (unaugmented)."""
    from tlpipe.backbones import build_extractor
    from tlpipe.datasets import image_dataset
    from tlpipe.models import fit_probe, inference_function

    size = spec["image_size"]
    extractor, _ = build_extractor(spec["arch"], size, spec["weights"], seed)
    forward = inference_function(extractor, (None, size, size, 3))
    batches = image_dataset(paths, size, 32)
    features = np.concatenate([np.asarray(forward(images)) for images in batches])
    return fit_probe(features, labels, 2, 0.2, None, seed).head


def epoch_timer() -> Any:
    """A Keras callback keeping each epoch's wall time (training and validation) in `seconds`."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def fine_tuning_run(
    key: str, spec: dict[str, Any], head_file: Path, tune: dict[str, Any], rows: dict[str, Any], seed: int
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Fine-tune as the stage does, with `tune` (params.yaml's finetune: section); (its numbers, whether
    the model that would ship classifies each test image right, what it trained: a Training)."""
    import tensorflow as tf

    from tlpipe.activation_cache import cache_bound_bytes, find_cut, plan_cache, training_on
    from tlpipe.datasets import image_dataset
    from tlpipe.finetuning import batch_forward, dataset_probabilities, fine_tune, ship_model, unfreeze_top
    from tlpipe.models import load_model
    from tlpipe.runtime import seed_everything

    seed_everything(seed)
    strategy = tf.distribute.get_strategy()
    started = time.perf_counter()
    head = load_model(head_file)
    model, base = ship_model(key, spec, head, tune["augment"], seed)
    unfrozen = unfreeze_top(base, tune["unfreeze"])
    cut = find_cut(base, unfrozen)
    (train_paths, y_train), (val_paths, y_val), (test_paths, y_test) = (rows[s] for s in ("train", "val", "test"))
    plan = plan_cache(cut, tune["cached_views"], tune["epochs"], len(y_train), len(y_val), cache_bound_bytes())
    print(f"{key}: {plan.reason}", file=sys.stderr)
    size, batch_size = spec["image_size"], tune["batch_size"]
    set_up = time.perf_counter()
    splits = ((train_paths, y_train), (val_paths, y_val))
    training = training_on(key, (model, base, head), plan, splits, size, batch_size, seed, strategy)
    # Where it caches, setting up is building the cache (the datasets are lazy).
    cache_s = round(time.perf_counter() - set_up, 1) if plan.views else None
    timer = epoch_timer()
    result = fine_tune(key, training, strategy, y_train, len(y_val), 2, tune, None, [timer])
    training.val_probabilities()  # the calibration pass
    total_s = time.perf_counter() - started
    test = dataset_probabilities(batch_forward(model, (size, size, 3)), image_dataset(test_paths, size, 32, y_test))
    correct = test.argmax(axis=1) == y_test
    first = len(base.layers) - unfrozen
    return (
        {
            "views": plan.views,
            "epochs": len(timer.seconds),
            "epoch_s": round(statistics.median(timer.seconds), 2),
            "cache_s": cache_s,
            "total_s": round(total_s, 1),
            "cache_bytes": plan.bytes,
            "crossing": list(plan.cut.layers) if plan.cut else [],
            "shipped": "fine-tuned" if result.shipped else "frozen",
            "val_loss": round(result.tuned[0], 4),
            "accuracy": round(float(correct.mean()), 4),
            "accuracy_ci": list(accuracy_interval(correct)),
            "flops": flops(base, first, head),
        },
        correct,
        training,
    )


def interleaved_epochs(trainings: dict[str, Any], pairs: int) -> dict[str, list[float]]:
    """Wall times of `pairs` more epochs (training and validation) of each compiled Training, in turn (one
    of the first, one of the second, ...), so that the machine's drift and other load weigh on both alike."""
    seconds: dict[str, list[float]] = {name: [] for name in trainings}
    for _ in range(pairs):
        for name, training in trainings.items():
            started = time.perf_counter()
            training.model.fit(training.train, validation_data=training.val, epochs=1, shuffle=False, verbose=0)
            seconds[name].append(round(time.perf_counter() - started, 2))
    return seconds


def accuracy_interval(correct: np.ndarray) -> tuple[float, float]:
    from tlpipe.statistics import accuracy_interval as interval

    return interval(correct, CONFIDENCE)


def flops(base: Any, first: int, head: Any) -> dict[str, float]:
    """GFLOPs per image of the frozen part (base.layers before `first`) and of the trained part (the rest and
    the head), and the bound on the speed-up per epoch that skipping the frozen part allows."""
    bottom = sum(layer_flops(layer) for layer in base.layers[:first])
    top = sum(layer_flops(layer) for layer in base.layers[first:]) + sum(layer_flops(layer) for layer in head.layers)
    return {"frozen_gflops": round(bottom / 1e9, 3), "trained_gflops": round(top / 1e9, 3)}


def epoch_bound(frozen: float, trained: float, n_train: int, n_val: int) -> float:
    """The speed-up per epoch from skipping the frozen part, counting FLOPs only: a training step costs
    STEP_COST_IN_FORWARD_PASSES forward passes of what it trains, validation one forward pass."""
    from tlpipe.finetuning import STEP_COST_IN_FORWARD_PASSES as step

    images = n_train * (frozen + step * trained) + n_val * (frozen + trained)
    return images / (n_train * step * trained + n_val * trained)


def subset(rows: dict[str, Any], sizes: dict[str, int] | None, seed: int) -> dict[str, Any]:
    """A seeded random subset of each split's (paths, labels), in the manifest's order; all without `sizes`."""
    if sizes is None:
        return rows
    out = {}
    for split, (paths, labels) in rows.items():
        chosen = np.sort(np.random.default_rng(seed).permutation(len(labels))[: sizes[split]])
        out[split] = ([paths[i] for i in chosen], labels[chosen])
    return out


def measure(
    shared: Path,
    views: int | None,
    head_images: int,
    epochs: dict[str, int],
    images: dict[str, dict[str, int]],
    pairs: dict[str, int],
    only: list[str] | None,
) -> dict:
    from tlpipe.datasets import read_manifest, split_rows
    from tlpipe.models import save_model
    from tlpipe.statistics import paired_comparison

    archive = shared / ZIP
    missing = [p for p in (archive, *(shared / "weights" / w for w in SHARED_WEIGHTS.values())) if not p.is_file()]
    if missing:
        sys.exit(f"{missing[0]} not found; see CONTRIBUTING.md (the folder SHARED_DIR names)")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    seed, tune = params["seed"], params["finetune"]
    views = tune["cached_views"] if views is None else views
    results = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as folder:
        project = prepared_project(Path(folder), archive)
        previous = Path.cwd()
        os.chdir(project)
        try:
            manifest = read_manifest()
            all_rows = {}
            for split in ("train", "val", "test"):
                part = split_rows(manifest, split)
                all_rows[split] = (list(part["path"]), part["label_index"].to_numpy())
            for key, (arch, unfreeze, default_epochs, default_images, default_pairs) in BACKBONES.items():
                if only and key not in only:
                    continue
                spec = {"arch": arch, "image_size": 224, "weights": str(shared / "weights" / SHARED_WEIGHTS[arch])}
                n_epochs = epochs.get(key, default_epochs or tune["epochs"])
                rows = subset(all_rows, images.get(key, default_images), seed)
                chosen = np.random.default_rng(seed).permutation(len(rows["train"][1]))[:head_images]
                paths, labels = rows["train"]
                head_file = Path(folder) / f"{key}_head.keras"
                save_model(fitted_head(spec, [paths[i] for i in chosen], labels[chosen], seed), head_file)
                runs, correct, trainings = {}, {}, {}
                for name, cached in (("images", 0), ("cached", views)):
                    settings = tune | {"unfreeze": unfreeze, "epochs": n_epochs, "cached_views": cached}
                    runs[name], correct[name], trainings[name] = fine_tuning_run(
                        key, spec, head_file, settings, rows, seed
                    )
                    print(f"{key} {name}: {runs[name]}", file=sys.stderr, flush=True)
                interleaved = interleaved_epochs(trainings, pairs.get(key, default_pairs))
                del trainings
                print(f"{key} interleaved epochs: {interleaved}", file=sys.stderr, flush=True)
                for name, seconds in interleaved.items():
                    runs[name]["interleaved_epoch_s"] = seconds
                flop = runs["cached"]["flops"]
                share = flop["frozen_gflops"] / (flop["frozen_gflops"] + flop["trained_gflops"])
                n_train, n_val = len(rows["train"][1]), len(rows["val"][1])
                results.append(
                    {
                        "backbone": key,
                        "arch": arch,
                        "unfreeze": unfreeze,
                        "epochs": n_epochs,
                        "n_train": n_train,
                        "n_val": n_val,
                        "n_test": len(rows["test"][1]),
                        "runs": runs,
                        "epoch_speedup": round(
                            statistics.median(interleaved["images"]) / statistics.median(interleaved["cached"]), 2
                        ),
                        "in_run_epoch_speedup": round(runs["images"]["epoch_s"] / runs["cached"]["epoch_s"], 2),
                        "total_speedup": round(runs["images"]["total_s"] / runs["cached"]["total_s"], 2),
                        "frozen_flop_share": round(share, 3),
                        "flop_bound": round(
                            epoch_bound(flop["frozen_gflops"], flop["trained_gflops"], n_train, n_val), 2
                        ),
                        "paired": paired_comparison(correct["images"], correct["cached"], CONFIDENCE),
                    }
                )
        finally:
            os.chdir(previous)
    return {"views": views, "cpus": os.cpu_count(), "backbones": results}


COLUMNS = {
    "backbone": "backbone (unfreeze, epochs run of allowed)",
    "images": "train / val / test images",
    "run": "fine-tuning on",
    "epoch_s": "s per epoch, in turn",
    "epoch_speedup": "per epoch vs images",
    "flop_bound": "FLOP bound per epoch",
    "cache_s": "cache (s)",
    "cache_mb": "cache (MB)",
    "total_s": "total (s)",
    "total_speedup": "total vs images",
    "val_loss": "val loss kept",
    "accuracy": "test accuracy (95% interval)",
    "p_value": "McNemar p vs images",
}


def rows_of(entry: dict[str, Any], views: int) -> list[dict[str, Any]]:
    out = []
    for name, run_ in entry["runs"].items():
        cached = name == "cached"
        low, high = run_["accuracy_ci"]
        out.append(
            {
                "backbone": f"{entry['arch']} ({entry['unfreeze']}, {run_['epochs']} of {entry['epochs']})",
                "images": f"{entry['n_train']:,} / {entry['n_val']:,} / {entry['n_test']:,}",
                "val_loss": f"{run_['val_loss']:.4f}",
                "run": f"cached activations, {views} views" if cached else "images",
                "epoch_s": f"{statistics.median(run_['interleaved_epoch_s']):.1f}",
                "epoch_speedup": f"{entry['epoch_speedup']:.2f}" if cached else "1.00",
                "flop_bound": f"{entry['flop_bound']:.2f}" if cached else "",
                "cache_s": f"{run_['cache_s']:.0f}" if cached else "",
                "cache_mb": f"{run_['cache_bytes'] / 1e6:.0f}" if cached else "",
                "total_s": f"{run_['total_s']:.0f}",
                "total_speedup": f"{entry['total_speedup']:.2f}" if cached else "1.00",
                "accuracy": f"{run_['accuracy']:.3f} ({low:.3f}–{high:.3f})",
                "p_value": f"{entry['paired']['p_value']:.2f}" if cached else "",
            }
        )
    return out


def table(report: dict[str, Any]) -> str:
    rows = [row for entry in report["backbones"] for row in rows_of(entry, report["views"])]
    shares = ", ".join(f"{e['arch']} {e['frozen_flop_share']:.0%}" for e in report["backbones"])
    return "\n".join(
        [
            f"{measured(report, NAME)}: fine-tuning on `cats_and_dogs_filtered` (the pipeline's splits; VGG16 on "
            f"a seeded subset of each) with ImageNet weights on {report['cpus']} CPU cores, on the images and on "
            "cached activations, from the same start, one after the other. Early stopping may end a run before "
            "its epochs. The seconds per epoch are of more epochs of the two taken in turn after both runs, so "
            "that other load on the machine weighs on both alike; a total (the setup, the cache, fine-tuning and "
            "the calibration pass) comes from each run, under whatever else the machine ran then. McNemar's "
            f"exact test compares the two runs' test answers. The frozen part's share of the forward pass's "
            f"FLOPs: {shares}.",
            "",
            markdown(rows, COLUMNS, left=3),
        ]
    )


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        epochs = {key: int(n) for key, n in args.epochs or []}
        images = {key: {"train": int(a), "val": int(b), "test": int(c)} for key, a, b, c in args.images or []}
        pairs = {key: int(n) for key, n in args.pairs or []}
        report = stamp() | measure(args.shared, args.views, args.head_images, epochs, images, pairs, args.only)
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
