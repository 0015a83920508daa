"""Every default backbone's shipped model in every export format: `python -m benchmarks.export`.

For each backbone of params.yaml (ImageNet weights where the shared folder has them, random otherwise: the same
graph and compute), it builds the model `finetune` ships (tlpipe.finetuning.ship_model) with the linear probe
fitted on the features of the first --train-images training images of the shared zip (not fine-tuned: the
export costs the same), converts it to every format of tlpipe/export.py, and measures in this process:
- conversion time, and size on disk (the .keras file's for the `keras` row);
- test accuracy, agreement and the largest probability difference against the .keras model over the first
  --images validation images of the shared zip, each format run by its own runtime;
- single-image latency p50 and p95 on one real test image, and its ratio to the .keras model's, measured in
  the same run.
It also measures each backbone's deployment cost as the pipeline's comparison reports it
(tlpipe.extraction.deployment_cost on the float32 base: size on disk, single-image latency), with its
parameters and its in-memory batch throughput (batches of 32, float32).

Writes benchmarks/export.json and its tables into docs/export.md and docs/performance.md (the `export` markers).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import (
    Block,
    backbones_with_offline_weights,
    benchmark_parser,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from tests.helpers import SHARED_DIR
from tlpipe import export
from tlpipe.latency import latency_ms
from tlpipe.params import EXPORT_FORMATS

NAME = "export"
PAGES = ("docs/export.md", "docs/performance.md")
AUGMENT = {"flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}
CLASSES = ("cats", "dogs")


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--images", type=int, default=200, help="test images for accuracy and agreement")
    parser.add_argument("--train-images", type=int, default=200, help="training images the head is fitted on")
    parser.add_argument("--runs", type=int, default=50, help="timed single-image calls per format")
    parser.add_argument("--only", nargs="*", help="backbone keys (default: all of params.yaml)")
    return parser


def split_names(archive: zipfile.ZipFile, split: str, n: int) -> list[str]:
    """The first n images of a split of the shared zip, cats and dogs alternating."""
    names = sorted(name for name in archive.namelist() if f"/{split}/" in name and name.endswith(".jpg"))
    cats, dogs = [name for name in names if "/cats/" in name], [name for name in names if "/dogs/" in name]
    return [name for pair in zip(cats, dogs) for name in pair][:n]


def validation_names(archive: zipfile.ZipFile, n: int) -> list[str]:
    """The first n validation images of the shared zip, cats and dogs alternating."""
    return split_names(archive, "validation", n)


def labelled_images(shared: Path, split: str, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The first n images of a split of the shared zip as float32 RGB, and their class indices."""
    from PIL import Image

    with zipfile.ZipFile(shared / "data" / "cats_and_dogs_filtered.zip") as archive:
        names = split_names(archive, split, n)
        images = [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"), np.float32) for name in names]
    return images, np.array([int(f"/{CLASSES[1]}/" in name) for name in names])


def shipped_model(spec: dict[str, Any], head: Any = None) -> Any:
    """The model finetune ships: raw pixels -> probabilities, with `head`, or a head fitted on nothing (the
    cost is the same)."""
    from tlpipe.backbones import build_base
    from tlpipe.finetuning import ship_model
    from tlpipe.models import build_head

    if head is None:
        base = build_base(spec["arch"], spec["image_size"], spec["weights"])
        features = np.random.default_rng(0).normal(size=(16, base.output_shape[-1])).astype(np.float32)
        head = build_head(features, len(CLASSES), 0.2, 0)
    return ship_model("b", spec, head, AUGMENT, 0)[0]


def fitted_head(forward: Any, size: int, images: list[np.ndarray], labels: np.ndarray) -> Any:
    """The linear probe (the train stage's default head) fitted on the base's features of `images`, each resized
    as the shipped model resizes it."""
    import tensorflow as tf

    from tlpipe.models import fit_probe

    resized = np.stack([tf.image.resize(image, (size, size)).numpy() for image in images])
    features = np.concatenate([np.asarray(forward(resized[i : i + 32])) for i in range(0, len(resized), 32)])
    return fit_probe(features, labels, len(CLASSES), 0.2, None, 0).head


def deployment(key: str, spec: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the comparison's deployment columns for one backbone and its batch throughput in memory, its forward
    pass)."""
    from tlpipe.extraction import base_forward, deployment_cost, load_extractor

    extractor, n_params = load_extractor(key, spec)
    forward = base_forward(extractor, spec["image_size"], 1000)
    cost = deployment_cost(extractor, spec["image_size"], forward)
    batch = np.random.default_rng(0).uniform(0, 255, (32, spec["image_size"], spec["image_size"], 3)).astype(np.float32)
    forward(batch)
    started = time.perf_counter()
    for _ in range(5):
        forward(batch)
    row = {
        "backbone": key,
        "weights": "imagenet" if spec["weights"] else "random",
        "params_m": round(n_params / 1e6, 1),
        "base_mb": round(cost["base_bytes"] / 1e6, 1),
        "latency_ms_p50": cost["latency_ms_p50"],
        "latency_ms_p95": cost["latency_ms_p95"],
        "batch_images_per_s": round(5 * len(batch) / (time.perf_counter() - started), 1),
    }
    return row, forward


def measure(
    key: str, spec: dict[str, Any], head: Any, test: tuple[list[np.ndarray], np.ndarray], runs: int
) -> list[dict[str, Any]]:
    from tlpipe.inference import one_image
    from tlpipe.prediction import keras_classifier

    images, labels = test
    model = shipped_model(spec, head)
    keras_run = one_image(keras_classifier(model, []).batch_function(len(images)))
    reference = np.array([keras_run(image) for image in images])
    keras_latency = latency_ms(keras_run, images[0], runs)
    weights = "imagenet" if spec["weights"] else "random"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model.save(Path(folder) / "model.keras")
        rows.append(
            {"backbone": key, "format": "keras", "weights": weights}
            | {"size_mb": round((Path(folder) / "model.keras").stat().st_size / 1e6, 1)}
            | export.parity(reference, reference, labels)
            | keras_latency
            | {"latency_vs_keras": 1.0}
        )
        for name in EXPORT_FORMATS:
            started = time.perf_counter()
            failed = export.export_formats(model, [name], Path(folder))
            row: dict[str, Any] = {"backbone": key, "format": name, "weights": weights}
            row["convert_s"] = round(time.perf_counter() - started, 1)
            if failed:
                rows.append(row | {"failed": failed[name]})
                continue
            path = Path(folder) / export.FORMATS[name].path
            run = export.load_runner(name, path)
            row |= export.parity(reference, np.array([run(image) for image in images]), labels)
            row |= {"size_mb": round(export.artifact_size(path) / 1e6, 1)} | latency_ms(run, images[0], runs)
            row["latency_vs_keras"] = round(row["latency_ms_p50"] / keras_latency["latency_ms_p50"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


DEPLOYMENT_COLUMNS = {
    "backbone": "backbone",
    "weights": "weights",
    "params_m": "parameters (M)",
    "base_mb": "base weights (MB)",
    "latency_ms_p50": "latency p50 (ms)",
    "latency_ms_p95": "latency p95 (ms)",
    "batch_images_per_s": "batches of 32 (images/s)",
}
FORMAT_COLUMNS = {
    "backbone": "backbone",
    "format": "format",
    "size_mb": "size (MB)",
    "accuracy": "test accuracy",
    "agreement": "agreement with .keras",
    "max_probability_difference": "largest probability difference",
    "latency_ms_p50": "latency p50 (ms)",
    "latency_ms_p95": "latency p95 (ms)",
    "latency_vs_keras": "p50 vs .keras",
    "convert_s": "conversion (s)",
    "failed": "failed",
}


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """A format's row with its numbers rounded for reading."""
    formats = {
        "accuracy": "{:.3f}",
        "agreement": "{:.3f}",
        "max_probability_difference": "{:.2g}",
        "latency_ms_p50": "{:.1f}",
        "latency_ms_p95": "{:.1f}",
        "latency_vs_keras": "{:.2f}",
    }
    return row | {key: pattern.format(row[key]) for key, pattern in formats.items() if row.get(key) is not None}


def runtimes_against_keras(formats: list[dict[str, Any]]) -> str:
    """Per backbone, LiteRT's and ONNX Runtime's single-image latency as a share of the .keras model's."""
    parts = []
    for backbone in dict.fromkeys(r["backbone"] for r in formats):
        ratios = {r["format"]: r["latency_vs_keras"] for r in formats if r["backbone"] == backbone}
        if "tflite" in ratios and "onnx" in ratios:
            parts.append(f"{backbone} {ratios['tflite']:.2f} and {ratios['onnx']:.2f}")
    return "; ".join(parts)


def table(report: dict[str, Any]) -> str:
    formats = [r for r in report["formats"] if r["format"] != "keras" and not r.get("failed")]
    floats = [r for r in formats if r["format"] in ("saved_model", "tflite", "onnx")]
    columns = FORMAT_COLUMNS if any(r.get("failed") for r in report["formats"]) else FORMAT_COLUMNS | {"failed": None}
    columns = {key: header for key, header in columns.items() if header}
    lines = [
        f"{measured(report, NAME)}: each backbone's shipped model with the linear probe fitted on "
        f"{report['train_images']} training images of `cats_and_dogs_filtered`; accuracy and agreement over "
        f"{report['images']} validation images, each format in its own runtime; latency is wall-clock on one photo "
        f"({report['runs']} calls). The run took {report['seconds'] / 60:.0f} minutes.",
        "",
        "What the frozen base costs where it ships (float32, as the comparison reports it):",
        "",
        markdown(report["deployment"], DEPLOYMENT_COLUMNS, left=2),
        "",
        markdown([shown(r) for r in report["formats"]], columns, left=2),
    ]
    if floats:
        worst = min(r["agreement"] for r in floats)
        lines += [
            "",
            "Every float format (SavedModel, LiteRT, ONNX) agreed with the `.keras` model on "
            + ("every test image" if worst == 1 else f"at least {worst:.1%} of the test images")
            + f", within {max(r['max_probability_difference'] for r in floats):.2g} in any probability. "
            f"Single-image latency of LiteRT and ONNX Runtime against the `.keras` model's: "
            f"{runtimes_against_keras(formats)}.",
        ]
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        started = time.perf_counter()
        train = labelled_images(args.shared, "train", args.train_images)
        test = labelled_images(args.shared, "validation", args.images)
        rows, costs = [], []
        for key, spec in backbones_with_offline_weights(args.shared).items():
            if args.only and key not in args.only:
                continue
            cost, forward = deployment(key, spec)
            costs.append(cost)
            print(cost, flush=True)
            head = fitted_head(forward, spec["image_size"], *train)
            rows += measure(key, spec, head, test, args.runs)
        report = stamp() | {
            "images": len(test[0]),
            "train_images": len(train[0]),
            "runs": args.runs,
            "seconds": round(time.perf_counter() - started, 1),
            "deployment": costs,
            "formats": rows,
        }
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
