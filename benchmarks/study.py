"""The default study on real data: `python -m benchmarks.study` (needs the shared data, see SHARED_DIR).

Runs `dvc repro` of this project in a throwaway copy on `cats_and_dogs_filtered`, with the two backbones that
have offline ImageNet weights (VGG16 and MobileNetV2) and `model: mobilenet`, every other parameter as
params.yaml has it. It keeps what `reports/comparison.csv`, `metrics/model.json` and the crossval metrics say,
and the wall time of the whole run, in benchmarks/study.json, and writes the results table into README.md and
docs/results.md (between the `study` markers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import Block, benchmark_parser, load_results, measured, publish, save_results, stamp
from tests.helpers import SHARED_DIR, make_project

NAME = "study"
PAGES = ("README.md", "docs/results.md")
BACKBONES = {
    "mobilenet": ("MobileNetV2", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5", "float32"),
    "vgg16": ("VGG16", "vgg16_imagenet_notop.weights.h5", None),
}
KEPT = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "difference_to_best", "difference_ci_low")
KEPT += ("difference_ci_high", "p_value", "verdict", "cv_accuracy_mean", "cv_accuracy_std", "f1", "roc_auc")
KEPT += ("loss", "ece", "ece_calibrated", "params", "images_per_second", "arch")


def study_project(root: Path, shared: Path) -> Path:
    backbones = {}
    for key, (arch, file, precision) in BACKBONES.items():
        backbones[key] = {"arch": arch, "image_size": 224, "weights": str(shared / "weights" / file)}
        if precision:
            backbones[key]["precision"] = precision
    url = f"file://{shared / 'data' / 'cats_and_dogs_filtered.zip'}"
    return make_project(root, {"data": {"url": url}, "backbones": backbones, "model": "mobilenet"})


def run_study(project: Path) -> dict[str, Any]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--quiet"], cwd=project, check=True)
    seconds = time.perf_counter() - started
    table = pd.read_csv(project / "reports" / "comparison.csv", keep_default_na=False, na_values=[""])
    rows = [{k: (None if pd.isna(row[k]) else row[k]) for k in ("backbone", *KEPT)} for row in table.to_dict("records")]
    model = json.loads((project / "metrics" / "model.json").read_text())
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    crossval = {key: json.loads((project / "metrics" / "crossval" / f"{key}.json").read_text()) for key in BACKBONES}
    return {
        "repro_seconds": round(seconds, 1),
        "rows": rows,
        "recommended": summary["recommended"],
        "recommended_reason": summary["recommended_reason"],
        "shipped": model.get("shipped"),
        "shipped_reason": model.get("shipped_reason"),
        "fine_tuning": model.get("fine_tuning"),
        "temperatures": {
            name: {
                k: m.get(k) for k in ("temperature", "temperature_fitted", "temperature_p_value", "temperature_source")
            }
            for name, m in [("model", model)]
            + [(key, json.loads((project / "metrics" / f"{key}.json").read_text())) for key in BACKBONES]
        },
        "crossval": crossval,
    }


def number(value: Any, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{measured(report, NAME)}: `dvc repro` of the default parameters with `model: mobilenet`, {report['repro_seconds'] / 60:.0f} minutes in all.",
        "",
        "| backbone | accuracy [95% interval] | vs best [95% interval] | McNemar p | verdict | cross-validated "
        "accuracy | F1 | ROC AUC | log loss | ECE (scaled) | params | images/s |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in report["rows"]:
        best = row["verdict"] == "best"
        name = "`model` (mobilenet, shipped)" if row["backbone"] == "model" else f"`{row['backbone']}` (frozen)"
        lines.append(
            f"| {name} | {row['accuracy']:.4f} [{row['accuracy_ci_low']:.4f}, {row['accuracy_ci_high']:.4f}] | "
            + (
                "– | – | "
                if best
                else f"{row['difference_to_best']:+.4f} [{row['difference_ci_low']:+.4f}, "
                f"{row['difference_ci_high']:+.4f}] | {row['p_value']:.3g} | "
            )
            + f"{row['verdict']} | "
            + number(row["cv_accuracy_mean"], "{:.4f}")
            + ("" if row["cv_accuracy_std"] is None else f" ± {row['cv_accuracy_std']:.4f}")
            + f" | {row['f1']:.4f} | {row['roc_auc']:.4f} | {row['loss']:.4f} | {row['ece']:.4f} "
            f"({row['ece_calibrated']:.4f}) | {row['params'] / 1e6:.1f} M | {row['images_per_second']:.0f} |"
        )
    lines += [
        "",
        f"**Recommended: `{report['recommended']}`** "
        f"{report['recommended_reason'].removeprefix(report['recommended'] + ' ')}. Shipped: "
        f"{report['shipped']} ({report['shipped_reason']}); against the frozen head, fine-tuning "
        f"{report['fine_tuning']}.",
    ]
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        with tempfile.TemporaryDirectory(prefix="tl-study-") as tmp:
            report = stamp() | run_study(study_project(Path(tmp) / "project", args.shared))
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
