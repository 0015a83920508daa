"""Every default backbone's shipped model in every export format: `python -m benchmarks.export`.

For each backbone of params.yaml (ImageNet weights where ../shared has them, random otherwise: the same
graph and compute), it builds the model `finetune` ships (tlpipe.finetuning.ship_model) with a head fitted
on nothing (random), converts it to every format of tlpipe/export.py, and measures in this process:
- conversion time, and size on disk;
- agreement and the largest probability difference against the .keras model over real test images of the
  shared zip, each format run by its own runtime (accuracy needs a trained head: the pipeline's
  metrics/export.json has it);
- single-image latency p50 and p95 on one real test image, and its ratio to the .keras model's, measured in
  the same run.
It also measures each backbone's deployment cost as the pipeline's comparison reports it
(tlpipe.extraction.deployment_cost on the float32 base: size on disk, single-image latency), with its
parameters and its in-memory batch throughput (batches of 32, float32).
It prints two Markdown tables (benchmarks/README.md "Export" holds the last ones).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.benchmark import PROJECT_ROOT, backbones_with_offline_weights
from tlpipe import export
from tlpipe.latency import latency_ms
from tlpipe.params import EXPORT_FORMATS

AUGMENT = {"flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}


def test_images(shared: Path, n: int) -> list[np.ndarray]:
    """The first n validation images of the shared zip (cats and dogs alternating), as float32 RGB."""
    from PIL import Image

    with zipfile.ZipFile(shared / "data" / "cats_and_dogs_filtered.zip") as archive:
        return [
            np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"), dtype=np.float32)
            for name in validation_names(archive, n)
        ]


def validation_names(archive: zipfile.ZipFile, n: int) -> list[str]:
    """The first n validation images of the shared zip, cats and dogs alternating."""
    names = sorted(name for name in archive.namelist() if "/validation/" in name and name.endswith(".jpg"))
    cats, dogs = [name for name in names if "/cats/" in name], [name for name in names if "/dogs/" in name]
    return [name for pair in zip(cats, dogs) for name in pair][:n]


def shipped_model(spec: dict[str, Any]) -> Any:
    from tlpipe.backbones import build_base
    from tlpipe.finetuning import ship_model
    from tlpipe.models import build_head

    base = build_base(spec["arch"], spec["image_size"], spec["weights"])
    features = np.random.default_rng(0).normal(size=(16, base.output_shape[-1])).astype(np.float32)
    head = build_head(features, 2, 0.2, 0)
    return ship_model("b", spec, head, AUGMENT, 0)[0]


def deployment(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The comparison's deployment columns for one backbone, and its batch throughput in memory."""
    from tlpipe.extraction import base_forward, deployment_cost, load_extractor

    extractor, n_params = load_extractor(key, spec)
    forward = base_forward(extractor, spec["image_size"], 1000)
    cost = deployment_cost(extractor, spec["image_size"], forward)
    batch = np.random.default_rng(0).uniform(0, 255, (32, spec["image_size"], spec["image_size"], 3)).astype(np.float32)
    forward(batch)
    started = time.perf_counter()
    for _ in range(5):
        forward(batch)
    return {
        "backbone": key,
        "weights": "imagenet" if spec["weights"] else "random",
        "params_m": round(n_params / 1e6, 1),
        "base_mb": round(cost["base_bytes"] / 1e6, 1),
        "latency_ms_p50": cost["latency_ms_p50"],
        "latency_ms_p95": cost["latency_ms_p95"],
        "batch_images_per_s": round(5 * len(batch) / (time.perf_counter() - started), 1),
    }


def measure(key: str, spec: dict[str, Any], images: list[np.ndarray], runs: int) -> list[dict[str, Any]]:
    from tlpipe.inference import one_image
    from tlpipe.prediction import keras_classifier

    model = shipped_model(spec)
    keras_run = one_image(keras_classifier(model, []).batch_function(len(images)))
    reference = np.array([keras_run(image) for image in images])
    keras_latency = latency_ms(keras_run, images[0], runs)
    rows = [
        {"backbone": key, "format": "keras", "weights": "imagenet" if spec["weights"] else "random"} | keras_latency
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in EXPORT_FORMATS:
            started = time.perf_counter()
            failed = export.export_formats(model, [name], Path(folder))
            row: dict[str, Any] = {
                "backbone": key,
                "format": name,
                "convert_s": round(time.perf_counter() - started, 1),
            }
            if failed:
                rows.append(row | {"failed": failed[name]})
                continue
            path = Path(folder) / export.FORMATS[name].path
            run = export.load_runner(name, path)
            scores = export.parity(reference, np.array([run(image) for image in images]), reference.argmax(axis=1))
            row |= {k: scores[k] for k in ("agreement", "max_probability_difference")}
            row |= {"size_mb": round(export.artifact_size(path) / 1e6, 1)} | latency_ms(run, images[0], runs)
            row["latency_vs_keras"] = round(row["latency_ms_p50"] / keras_latency["latency_ms_p50"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


FORMAT_COLUMNS = [
    "backbone",
    "format",
    "convert_s",
    "size_mb",
    "agreement",
    "max_probability_difference",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_vs_keras",
    "failed",
]


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("SHARED_DIR", PROJECT_ROOT.parent / "shared"))
    )
    parser.add_argument("--images", type=int, default=200, help="test images for agreement")
    parser.add_argument("--runs", type=int, default=50, help="timed single-image calls per format")
    parser.add_argument("--only", nargs="*", help="backbone keys (default: all of params.yaml)")
    args = parser.parse_args()
    images = test_images(args.shared, args.images)
    rows, costs = [], []
    for key, spec in backbones_with_offline_weights(args.shared).items():
        if not args.only or key in args.only:
            costs.append(deployment(key, spec))
            print(costs[-1], flush=True)
            rows += measure(key, spec, images, args.runs)
    print(markdown(costs, list(costs[0])))
    print()
    print(markdown(rows, FORMAT_COLUMNS))


if __name__ == "__main__":
    main()
