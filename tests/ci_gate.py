"""CI's metric gate: `python -m tests.ci_gate [--update]`.

Runs the whole pipeline on a small committed configuration (tests/gate/params.yaml over a synthetic zip,
randomly initialised backbones: fast and deterministic) in a throwaway repository whose HEAD holds the
committed metrics (tests/gate/metrics/), then runs `python -m stages.check_metrics` against HEAD.
A change that makes the model worse turns CI red. `--update` accepts the new metrics as the baseline.

CI runs the same check inside the test suite: tests/test_pipeline_e2e.py builds its project with
`gate_project` and its first test is `check_against_baseline`, so one pipeline run serves both.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.helpers import PROJECT_ROOT, make_project, run
from tests.synthetic import write_dataset_zip

GATE_DIR = PROJECT_ROOT / "tests" / "gate"
BASELINE_DIR = GATE_DIR / "metrics"


def gate_project(root: Path, with_baseline: bool = True) -> Path:
    """A repository of the pipeline on the gate's configuration; with the committed metrics at HEAD."""
    root.mkdir(parents=True, exist_ok=True)
    overrides = yaml.safe_load((GATE_DIR / "params.yaml").read_text())
    overrides["data"] = {"url": write_dataset_zip(root / "synthetic.zip", n_train=30, n_test=15).as_uri()}
    project = make_project(root / "project", overrides)
    if with_baseline:
        shutil.copytree(BASELINE_DIR, project / "metrics")
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "committed baseline metrics"], project)
    return project


def check_against_baseline(project: Path) -> subprocess.CompletedProcess:
    """The gate on a reproduced project: exit code 0 when no metric regressed against HEAD."""
    return run([sys.executable, "-m", "stages.check_metrics", "--baseline", "HEAD"], project, check=False)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.ci_gate", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the new metrics to tests/gate/metrics/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ci-gate-") as tmp:
        project = gate_project(Path(tmp), with_baseline=not args.update)
        run([sys.executable, "-m", "dvc", "repro", "--quiet"], project)
        if args.update:
            shutil.rmtree(BASELINE_DIR, ignore_errors=True)
            BASELINE_DIR.mkdir(parents=True)
            for path in sorted((project / "metrics").glob("*.json")):
                shutil.copy2(path, BASELINE_DIR / path.name)
            print(f"baseline updated: {', '.join(p.name for p in sorted(BASELINE_DIR.iterdir()))}")
            return 0
        gate = check_against_baseline(project)
        print(gate.stdout, end="")
        print(gate.stderr, end="", file=sys.stderr)
        return gate.returncode


if __name__ == "__main__":
    sys.exit(main())
