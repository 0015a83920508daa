"""Killed runs leave nothing half-written, and the next `dvc repro` recomputes what was lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common import atomic_path, write_json
from tests.helpers import make_project, run
from tests.synthetic import write_dataset_zip


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and oct(target.stat().st_mode & 0o777) == "0o644"


def test_atomic_path_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    stale = tmp_path / ".head.tmp-abc123.keras"
    stale.write_text("half-written by a run killed with SIGKILL")
    with atomic_path(tmp_path / "head.keras") as tmp:
        tmp.write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.keras"]


def leftovers(project: Path) -> list[Path]:
    return [p for p in project.rglob("*.tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]


@pytest.mark.parametrize("stage", ["features@resnet50", "train@resnet50"])
def test_a_stage_killed_mid_run_is_recomputed(tmp_path: Path, stage: str) -> None:
    archive = write_dataset_zip(tmp_path / "images.zip", n_train=150, n_test=50, size=64)
    project = make_project(
        tmp_path / "project",
        {
            "data": {"url": archive.as_uri()},
            "backbones": {"resnet50": {"arch": "ResNet50", "image_size": 64, "weights": None}},
            "model": "resnet50",
        },
    )
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(project)}
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", stage], cwd=project, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in repro.stdout:  # wait until the stage under test has started working
            if f"Running stage '{stage}'" in line:
                break
        time.sleep(3.0)
        assert repro.poll() is None, "the stage finished before it could be killed; give it more work"
    finally:
        os.killpg(repro.pid, signal.SIGKILL)  # the whole group: dvc and the stage it started
        repro.wait()
    outputs = {
        "features@resnet50": ["data/features/resnet50"],
        "train@resnet50": ["models/resnet50/head.keras", "metrics/train/resnet50"],
    }[stage]
    assert not any((project / output).exists() for output in outputs)
    status = run([sys.executable, "-m", "dvc", "status", stage], project).stdout
    assert stage in status
    result = run([sys.executable, "-m", "dvc", "repro", stage], project)
    assert f"Running stage '{stage}'" in result.stdout
    assert all((project / output).exists() for output in outputs)
    assert leftovers(project) == []
