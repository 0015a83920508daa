"""Which head on few photos per class: `python -m benchmarks.heads` (needs the shared data, see SHARED_DIR).

Compares the heads of params.yaml `train.head` where users' data is small, on cached features:

- `logistic`: the linear probe (tlpipe.models.fit_probe);
- `keras`: the Keras head as the train stage now fits it where validation is too small to stop on: on
  train + val, for the median epoch cross-validation's folds kept (tlpipe.crossvalidation);
- `keras, early stopping on val`: the Keras head as it was fitted before, whatever the validation split's size.

Data:
- `cats_and_dogs_filtered` through frozen MobileNetV2 and VGG16 with the shared ImageNet weights: k = 5, 10
  and 20 photos per class drawn from the 2,000 training photos (seeded; a fifth of them, at least one, held
  out as validation, as `prepare` carves it), and all 2,000 (1,600 + 400, where validation decides). Every
  head is scored on the same 1,000 test photos.
- a synthetic set of 100 classes: Gaussian clusters in 512 dimensions, k = 5, 10 and 20 per class, 20 test
  images per class.

Each (data, k) runs over --seeds draws. It reports each head's test accuracy (mean and standard deviation over
the seeds, and the mean of each seed's Wilson 95% interval), and the seconds it took to fit (the Keras head's
include its cross-validation, which the pipeline runs anyway as crossval@<backbone>).

Then the cost of the defaults on the shared data: crossval, train and evaluate of MobileNetV2 on all of it, each
run as `dvc repro` runs it (its own process), with `train.head: keras` and with `logistic`, in the same run.

Writes benchmarks/heads.json and its tables into docs/small-data.md (between the `heads` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import PROJECT_ROOT, Block, benchmark_parser, load_results, measured, publish, save_results, stamp
from tests.helpers import SHARED_DIR, make_project, stages_in_process
from tlpipe.crossvalidation import cross_validate, fold_plan
from tlpipe.models import fit_probe, train_head
from tlpipe.scoring import class_probabilities
from tlpipe.small_data import median_epochs
from tlpipe.statistics import accuracy_interval

NAME = "heads"
PAGE = "docs/small-data.md"
HEADS = ("logistic", "keras", "keras, early stopping on val")
SIZES = (5, 10, 20)
VAL_FRACTION = 0.2
WEIGHTS = {
    "mobilenet": ("MobileNetV2", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5", "float32"),
    "vgg16": ("VGG16", "vgg16_imagenet_notop.weights.h5", "bfloat16"),
}


def train_settings() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["train"]


def real_features(project: Path, shared: Path) -> dict[str, dict[str, np.ndarray]]:
    """MobileNetV2 and VGG16 features of the shared cats_and_dogs_filtered, extracted by the pipeline's own
    stages in a throwaway project; a project left by an earlier run keeps its features and gets this code."""
    backbones = {
        key: {"arch": arch, "image_size": 224, "weights": str(shared / "weights" / file), "precision": precision}
        for key, (arch, file, precision) in WEIGHTS.items()
    }
    overrides = {"data": {"url": f"file://{shared / 'data' / 'cats_and_dogs_filtered.zip'}"}, "backbones": backbones}
    if (project / "data/features/vgg16/features.npz").is_file():
        for name in ("stages", "tlpipe"):
            shutil.copytree(PROJECT_ROOT / name, project / name, dirs_exist_ok=True)
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        params["data"] |= overrides["data"]
        (project / "params.yaml").write_text(yaml.safe_dump(params | {"backbones": backbones, "model": "mobilenet"}))
    else:
        make_project(project, overrides | {"model": "mobilenet"})
        stages_in_process(project, ("fetch",), ("prepare",), *[("features", key) for key in WEIGHTS])
    features = {}
    for key in WEIGHTS:
        with np.load(project / "data/features" / key / "features.npz") as data:
            features[key] = {name: data[name] for name in data.files}
    return features


def real_pool(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All 2,000 training photos (train and val) as the pool, and the 1,000 test photos."""
    return {
        "x": np.concatenate([features["x_train"], features["x_val"]]).astype(np.float32),
        "y": np.concatenate([features["y_train"], features["y_val"]]),
        "x_test": features["x_test"].astype(np.float32),
        "y_test": features["y_test"],
    }


def synthetic_pool(n_classes: int = 100, dim: int = 512, per_class: int = 40, test: int = 20) -> dict[str, Any]:
    """Gaussian clusters: class means drawn N(0, 1), images their mean plus N(0, 4^2) noise in every dimension
    (hard enough that 5 images per class leave much to learn)."""
    rng = np.random.default_rng(100)
    means = rng.normal(size=(n_classes, dim))

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(n_classes), count)
        return (means[y] + 4.0 * rng.normal(size=(len(y), dim))).astype(np.float32), y

    (x, y), (x_test, y_test) = draw(per_class), draw(test)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def subset(pool: dict[str, np.ndarray], k: int | None, seed: int) -> tuple[np.ndarray, ...]:
    """k photos per class from the pool (None: all), split into train and val as prepare carves val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(pool["y"]):
        members = rng.permutation(np.flatnonzero(pool["y"] == label))[: k or None]
        n_val = min(max(round(VAL_FRACTION * len(members)), 1), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    train, val = np.array(train), np.array(val)
    return pool["x"][train], pool["y"][train], pool["x"][val], pool["y"][val]


def fit_head(head: str, data: tuple[np.ndarray, ...], n_classes: int, settings: dict[str, Any], seed: int) -> Any:
    """The head fitted as the train stage fits it where validation is small (or, for the last, as before)."""
    import tensorflow as tf

    x_train, y_train, x_val, y_val = data
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    if head == "logistic":
        return fit_probe(x_all, y_all, n_classes, settings["dropout"], settings["class_weight"], seed).head
    keras_settings = settings | {"head": "keras"}
    strategy = tf.distribute.get_strategy()
    if head == "keras, early stopping on val":
        return train_head((x_train, y_train), (x_val, y_val), n_classes, keras_settings, seed, strategy, [])[0]
    plan = fold_plan(y_all, [str(c) for c in range(n_classes)], 5)
    folds = cross_validate(x_all, y_all, n_classes, keras_settings, plan.folds, 2, VAL_FRACTION, seed)
    epochs = median_epochs(folds.best_epochs)
    return train_head((x_all, y_all), None, n_classes, keras_settings, seed, strategy, [], epochs)[0]


def compare(pool: dict[str, np.ndarray], k: int | None, seeds: int, settings: dict[str, Any]) -> dict[str, Any]:
    n_classes = int(pool["y"].max()) + 1
    rows: dict[str, dict[str, list[float]]] = {
        head: {"accuracy": [], "low": [], "high": [], "seconds": []} for head in HEADS
    }
    for seed in range(seeds):
        data = subset(pool, k, seed)
        for head in HEADS:
            if k is None and head == "keras":
                continue  # with all 2,000 photos validation decides: the pipeline early-stops on it
            started = time.perf_counter()
            model = fit_head(head, data, n_classes, settings, seed)
            seconds = time.perf_counter() - started
            probabilities = class_probabilities(np.asarray(model(pool["x_test"], training=False)))
            right = probabilities.argmax(axis=1) == pool["y_test"]
            low, high = accuracy_interval(right, 0.95)
            for name, value in (("accuracy", right.mean()), ("low", low), ("high", high), ("seconds", seconds)):
                rows[head][name].append(float(value))
    return {
        head: {
            "accuracy_mean": round(float(np.mean(r["accuracy"])), 4),
            "accuracy_std": round(float(np.std(r["accuracy"], ddof=1)), 4) if len(r["accuracy"]) > 1 else 0.0,
            "interval_mean": [round(float(np.mean(r["low"])), 4), round(float(np.mean(r["high"])), 4)],
            "seconds_mean": round(float(np.mean(r["seconds"])), 2),
            "seeds": len(r["accuracy"]),
        }
        for head, r in rows.items()
        if r["accuracy"]
    }


def stage_costs(project: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Wall seconds of crossval, train and evaluate of mobilenet, each in its own process as dvc runs it, with
    each head; the heads alternate `repeats` times so that both see the machine in the same state."""
    params_file = project / "params.yaml"
    original = params_file.read_text()
    seconds: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(repeats):
            for head in ("keras", "logistic"):
                params = yaml.safe_load(original)
                params["train"]["head"] = head
                params_file.write_text(yaml.safe_dump(params, sort_keys=False))
                if not (project / "data/audit/dropped_test.csv").is_file():
                    (project / "data/audit").mkdir(parents=True, exist_ok=True)
                    (project / "data/audit/dropped_test.csv").write_text("path\n")
                for stage in ("crossval", "train", "evaluate"):
                    started = time.perf_counter()
                    subprocess.run(
                        [sys.executable, "-m", f"stages.{stage}", "mobilenet"],
                        cwd=project,
                        env=os.environ | {"PYTHONPATH": str(project)},
                        check=True,
                        capture_output=True,
                    )
                    seconds.setdefault(head, {}).setdefault(stage, []).append(time.perf_counter() - started)
    finally:
        params_file.write_text(original)
    return {
        head: {stage: round(float(np.median(v)), 1) for stage, v in by_stage.items()}
        for head, by_stage in seconds.items()
    }


def tables(report: dict[str, Any]) -> str:
    lines = [
        f"{measured(report, NAME)}, {report['seeds']} seeds per row: test accuracy, mean ± "
        "standard deviation over the seeds, with the mean of each seed's 95% interval; seconds to fit the head.",
        "",
        "| data | photos per class | " + " | ".join(HEADS) + " |",
        "|---|---:|" + "---|" * len(HEADS),
    ]
    for row in report["rows"]:
        cells = []
        for head in HEADS:
            r = row["heads"].get(head)
            cells.append(
                "–"
                if r is None
                else f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} [{r['interval_mean'][0]:.3f}, "
                f"{r['interval_mean'][1]:.3f}], {r['seconds_mean']:.1f} s"
            )
        lines.append(f"| {row['data']} | {row['k']} | " + " | ".join(cells) + " |")
    costs = report.get("stage_costs")
    if costs:
        lines += [
            "",
            "What the default costs on all of the shared data (MobileNetV2; each stage in its own process, median of "
            f"{report['cost_repeats']} alternating runs):",
            "",
            "| stage | keras | logistic | logistic / keras |",
            "|---|---:|---:|---:|",
        ]
        for stage in ("crossval", "train", "evaluate"):
            k, lg = costs["keras"][stage], costs["logistic"][stage]
            lines.append(f"| {stage} | {k:.1f} s | {lg:.1f} s | {lg / k:.2f} |")
        total_k, total_l = sum(costs["keras"].values()), sum(costs["logistic"].values())
        lines.append(f"| all three | {total_k:.1f} s | {total_l:.1f} s | {total_l / total_k:.2f} |")
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(PAGE, NAME): tables(report)}


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--project", type=Path, default=Path("/tmp/tl-heads-benchmark"), help="the throwaway project")
    parser.add_argument("--seeds", type=int, default=5, help="draws per (data, photos per class)")
    parser.add_argument("--cost-repeats", type=int, default=3, help="alternating runs of each stage's cost")
    return parser


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    settings = train_settings()
    rows = []
    for key, features in real_features(args.project, args.shared).items():
        pool = real_pool(features)
        for k in (*SIZES, None):
            rows.append(
                {
                    "data": f"cats_and_dogs_filtered, {key}",
                    "k": k or "all",
                    "heads": compare(pool, k, args.seeds, settings),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    pool = synthetic_pool()
    for k in SIZES:
        rows.append({"data": "100 synthetic classes", "k": k, "heads": compare(pool, k, args.seeds, settings)})
        print(json.dumps(rows[-1]), flush=True)
    return stamp() | {
        "seeds": args.seeds,
        "rows": rows,
        "cost_repeats": args.cost_repeats,
        "stage_costs": stage_costs(args.project, args.cost_repeats),
    }


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        report = measure_all(args)
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
