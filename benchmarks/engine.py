"""The ray engine's overhead against the local one: `python -m benchmarks.engine`.

A throwaway project with MobileNetV2 (the shared ImageNet weights, float32) prepares the shared
cats_and_dogs_filtered zip (3,000 images). Then the features stage runs as `dvc repro` runs it (its own
process) three times, in turn: `features.engine: local`; `ray` on a two-node Ray cluster on 127.0.0.1 with
one CPU per node (tests.helpers.local_ray_cluster, started here); and `ray` with `address: null` (the stage
starts Ray on this machine with two workers). It prints, and writes to benchmarks/engine.json, each run's
wall time and extraction time (meta.json `seconds`), their ratio to the local engine's, and how far each
engine's features are from the local engine's (relative to the largest feature), and renders its table into
docs/ray.md and docs/performance.md (the `engine` markers).

On a machine of 2 cores, two workers of one CPU each have no more compute than the local engine has: this
measures the engine's cost, not a speed-up, which needs more cores or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import Block, benchmark_parser, load_results, markdown, measured, publish, save_results, stamp
from tests.helpers import SHARED_DIR, local_ray_cluster, make_project, run

NAME = "engine"
PAGES = ("docs/ray.md", "docs/performance.md")
KEY = "mobilenet"
WEIGHTS = "weights/mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
ZIP = "data/cats_and_dogs_filtered.zip"


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    return parser


def set_engine(project: Path, engine: str, address: str | None = None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["engine"] = engine
    params["features"]["ray"] |= {"address": address, "workers": 2, "cpus_per_worker": 1}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def features_run(project: Path, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    run([sys.executable, "-m", "stages.features", KEY], project)
    wall = time.perf_counter() - started
    folder = project / "data" / "features" / KEY
    meta = json.loads((folder / "meta.json").read_text())
    shutil.copytree(folder, project.parent / name)
    return {"engine": name, "wall_s": round(wall, 1), "extraction_s": meta["seconds"], "images": meta["images"]}


def largest_difference(project: Path, name: str) -> float:
    """max |features - local features| / max |local features| over every array of the cache."""
    with (
        np.load(project.parent / "local" / "features.npz") as local,
        np.load(project.parent / name / "features.npz") as got,
    ):
        worst = 0.0
        for array in (name for name in local.files if name.startswith("x_") and local[name].size):
            expected = local[array].astype(np.float32)
            worst = max(worst, float(np.abs(got[array].astype(np.float32) - expected).max() / np.abs(expected).max()))
    return worst


def measure(shared: Path) -> list[dict[str, Any]]:
    weights, archive = shared / WEIGHTS, shared / ZIP
    for path in (weights, archive):
        if not path.is_file():
            sys.exit(f"{path} not found; see CONTRIBUTING.md (the folder SHARED_DIR names)")
    with tempfile.TemporaryDirectory(prefix="engine-") as folder:
        backbone = {KEY: {"arch": "MobileNetV2", "image_size": 224, "weights": str(weights), "precision": "float32"}}
        project = make_project(
            Path(folder) / "project", {"data": {"url": str(archive)}, "backbones": backbone, "model": KEY}
        )
        for stage in ("validate", "fetch", "prepare"):
            run([sys.executable, "-m", f"stages.{stage}"], project)
        runs = [features_run(project, "local")]
        with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
            set_engine(project, "ray", address)
            runs.append(features_run(project, "ray cluster of 2 nodes"))
            set_engine(project, "ray", None)
            runs.append(features_run(project, "ray started by the stage"))
        local = runs[0]
        for result in runs:
            result["wall_vs_local"] = round(result["wall_s"] / local["wall_s"], 2)
            result["extraction_vs_local"] = round(result["extraction_s"] / local["extraction_s"], 2)
            result["largest_difference"] = largest_difference(project, result["engine"])
    return runs


ENGINES = {
    "local": "local",
    "ray cluster of 2 nodes": "ray, a cluster of 2 nodes with 1 CPU each",
    "ray started by the stage": "ray, started by the stage (2 workers)",
}
COLUMNS = {
    "engine": "engine",
    "images": "images",
    "wall_s": "stage wall time (s)",
    "wall_vs_local": "wall time vs local",
    "extraction_s": "extraction (s)",
    "extraction_vs_local": "extraction vs local",
    "largest_difference": "largest difference from local",
}


def table(report: dict[str, Any]) -> str:
    rows = [
        r
        | {
            "engine": ENGINES.get(r["engine"], r["engine"]),
            "images": f"{r['images']:,}",
            "wall_vs_local": f"{r['wall_vs_local']:.2f}",
            "extraction_vs_local": f"{r['extraction_vs_local']:.2f}",
            "largest_difference": f"{r['largest_difference']:.2g}",
        }
        for r in report["runs"]
    ]
    return "\n".join(
        [
            f"{measured(report, NAME)}: the features stage on `cats_and_dogs_filtered` (MobileNetV2 with ImageNet "
            f"weights, float32), as `dvc repro` runs it, once per engine on {report['cpus']} CPU cores; the largest "
            "difference is relative to the largest feature.",
            "",
            markdown(rows, COLUMNS),
        ]
    )


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        report = stamp() | {"cpus": os.cpu_count(), "runs": measure(args.shared)}
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
