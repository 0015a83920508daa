"""The ray engine's overhead against the local one: `python -m benchmarks.engine`.

A throwaway project with MobileNetV2 (the shared ImageNet weights, float32) prepares the shared
cats_and_dogs_filtered zip (3,000 images). Then the features stage runs as `dvc repro` runs it (its own
process) three times, in turn: `features.engine: local`; `ray` on a two-node Ray cluster on 127.0.0.1 with
one CPU per node (tests.helpers.local_ray_cluster, started here); and `ray` with `address: null` (the stage
starts Ray on this machine with two workers). It prints, and writes to benchmarks/engine.json, each run's
wall time and extraction time (meta.json `seconds`), their ratio to the local engine's, and how far each
engine's features are from the local engine's (relative to the largest feature).

On a machine of 2 cores, two workers of one CPU each have no more compute than the local engine has: this
measures the engine's cost, not a speed-up, which needs more cores or machines.
"""

from __future__ import annotations

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

from benchmarks.benchmark import PROJECT_ROOT
from tests.helpers import SHARED_DIR, local_ray_cluster, make_project, run

KEY = "mobilenet"
WEIGHTS = SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"
REPORT = PROJECT_ROOT / "benchmarks" / "engine.json"


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


def main() -> None:
    for path in (WEIGHTS, ZIP):
        if not path.is_file():
            sys.exit(f"{path} not found; see README.md (real data beside the project, or SHARED_DIR)")
    with tempfile.TemporaryDirectory(prefix="engine-") as folder:
        backbone = {KEY: {"arch": "MobileNetV2", "image_size": 224, "weights": str(WEIGHTS), "precision": "float32"}}
        project = make_project(
            Path(folder) / "project", {"data": {"url": str(ZIP)}, "backbones": backbone, "model": KEY}
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
    print(f"{'engine':28} {'images':>6} {'wall s':>7} {'x local':>7} {'extract s':>9} {'x local':>7} {'max diff':>9}")
    for r in runs:
        print(
            f"{r['engine']:28} {r['images']:>6} {r['wall_s']:>7} {r['wall_vs_local']:>7} {r['extraction_s']:>9} "
            f"{r['extraction_vs_local']:>7} {r['largest_difference']:>9.1e}"
        )
    REPORT.write_text(json.dumps({"cpus": os.cpu_count(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
