"""The default `dvc repro` from nothing, at a baseline revision and now: `python -m benchmarks.default_run`.

For each code version, the baseline's (`--baseline REV`: its stages/, tlpipe/, dvc.yaml and params.yaml, copied
out with `git archive`) and then this working tree's, a throwaway project with that version's params.yaml as it
ships, except for the data (the shared cats_and_dogs_filtered zip, 3,000 images, by a file:// URL) and the
weights (the shared ImageNet files for VGG16 and MobileNetV2; random for the others, which costs the same
compute). Each runs `dvc repro` with an empty cache, timed as a whole and stage by stage (from the moment DVC
announces each stage), then `dvc repro` again, which must run nothing but fetch's check. The two versions run
one after the other on the same machine, and the ratio of their wall times is the speed-up.

Writes benchmarks/default_run.json and renders its table into README.md's quick start and docs/performance.md
(the `default_run` markers).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import (
    PROJECT_ROOT,
    SHARED_WEIGHTS,
    Block,
    benchmark_parser,
    code_at,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from tests.helpers import SHARED_DIR, make_project

NAME = "default_run"
PAGES = ("README.md", "docs/performance.md")
ZIP = "data/cats_and_dogs_filtered.zip"
# What a version of the pipeline is: its code, stages and parameters.
PIPELINE_FILES = ("stages", "tlpipe", "dvc.yaml", "params.yaml", ".gitignore")
# A stage's line in `dvc repro`'s output: it runs, or DVC skips or restores it.
STAGE_LINE = re.compile(r"^(?:Running stage|Stage) '([^']+)'")


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--baseline", default="HEAD", help="the git revision to compare this working tree with")
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    return parser


def offline_backbones(source: Path, shared: Path) -> dict[str, dict[str, Any]]:
    """`source`'s backbones as its params.yaml ships them, with the shared weights files where there are some."""
    backbones = yaml.safe_load((source / "params.yaml").read_text())["backbones"]
    for spec in backbones.values():
        weights = SHARED_WEIGHTS.get(spec["arch"])
        spec["weights"] = str(shared / "weights" / weights) if weights else None
    return backbones


def timed_repro(project: Path) -> tuple[float, dict[str, float], set[str]]:
    """`dvc repro` in `project`: (wall seconds, seconds from each stage's announcement to the next line of
    another stage or the end, the stages that ran)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    marks: list[tuple[str, float]] = []
    ran: set[str] = set()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if found := STAGE_LINE.match(line):
            marks.append((found.group(1), time.perf_counter()))
            if line.startswith("Running stage"):
                ran.add(found.group(1))
    if process.wait() != 0:
        sys.exit(f"dvc repro failed in {project}:\n{''.join(lines[-30:])}")
    ended = time.perf_counter()
    seconds: dict[str, float] = {}
    for (stage, at), (_, until) in zip(marks, [*marks[1:], ("", ended)]):
        seconds[stage] = seconds.get(stage, 0.0) + until - at
    return ended - started, seconds, ran


def measure_version(source: Path, root: Path, shared: Path) -> dict[str, Any]:
    """A fresh project of the code in `source`: `dvc repro` from nothing, then again."""
    overrides = {"data": {"url": (shared / ZIP).as_uri()}, "backbones": offline_backbones(source, shared)}
    project = make_project(root, overrides, source=source)
    wall, stages, _ = timed_repro(project)
    again, _, ran_again = timed_repro(project)
    model = json.loads((project / "metrics" / "model.json").read_text())
    groups = {"features": 0.0, "finetune": 0.0, "other": 0.0}
    for stage, seconds in stages.items():
        group = "features" if stage.startswith("features@") else stage if stage in groups else "other"
        groups[group] += seconds
    return {
        "seconds": round(wall, 1),
        "features_seconds": round(groups["features"], 1),
        "finetune_seconds": round(groups["finetune"], 1),
        "other_seconds": round(groups["other"], 1),
        "stage_seconds": {stage: round(seconds, 1) for stage, seconds in stages.items()},
        "accuracy": model["accuracy"],
        "second_repro_seconds": round(again, 1),
        "second_repro_ran": sorted(ran_again),
    }


def measure(baseline: str, shared: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "baseline-code"
        commit = code_at(baseline, source, PIPELINE_FILES)
        report: dict[str, Any] = stamp() | {"baseline_commit": commit}
        for name, code in (("baseline", source), ("now", PROJECT_ROOT)):
            report[name] = measure_version(code, folder / f"{name}-project", shared)
            print(name, json.dumps(report[name]), flush=True)
    report["speedup"] = round(report["baseline"]["seconds"] / report["now"]["seconds"], 2)
    return report


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    # What else the machine ran meanwhile, where something did (`load` in the results file).
    load = f" ({report['load']})" if report.get("load") else ""
    rows = []
    for name, title in (("baseline", f"before (`{report['baseline_commit']}`)"), ("now", "now")):
        version = report[name]
        rows.append(
            {
                "version": title,
                "total": minutes(version["seconds"]),
                "features": minutes(version["features_seconds"]),
                "finetune": minutes(version["finetune_seconds"]),
                "other": minutes(version["other_seconds"]),
                "accuracy": version["accuracy"],
                "again": f"{version['second_repro_seconds']:.0f} s",
            }
        )
    columns = {
        "version": "code",
        "total": "`dvc repro`, empty cache",
        "features": "five `features` stages",
        "finetune": "`finetune`",
        "other": "every other stage",
        "accuracy": "shipped model's test accuracy",
        "again": "`dvc repro` again",
    }
    block = (
        f"{measured(report, NAME)}: the default parameters on `cats_and_dogs_filtered` (3,000 photos), ImageNet "
        "weights for VGG16 and MobileNetV2 and random ones of the same cost for the other backbones; the two code "
        f"versions one after the other{load}. Now: {report['speedup']}x faster.\n\n" + markdown(rows, columns)
    )
    return {(page, NAME): block for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if not args.table_only:
        save_results(NAME, measure(args.baseline, args.shared))
    publish(blocks(load_results(NAME)))


if __name__ == "__main__":
    main()
