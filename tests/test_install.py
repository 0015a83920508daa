"""The README's commands in a shell where nothing is activated: no virtualenv on PATH, any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_project
from tests.synthetic import write_dataset_zip

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses

VENV_BIN = Path(sys.executable).parent
PLAIN_ENV = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}


def plain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `args` with nothing activated: a PATH without the virtualenv, no PYTHONPATH."""
    return subprocess.run(args, cwd=cwd, env=PLAIN_ENV, capture_output=True, text=True, timeout=600)


def test_venv_dvc_runs_the_stages_with_the_venvs_python(tmp_path: Path) -> None:
    dvc = VENV_BIN / "dvc"
    assert dvc.is_file(), f"{dvc} missing: set up with the README's `pip install -r requirements.txt`"
    archive = write_dataset_zip(tmp_path / "images.zip", n_train=4, n_test=2)
    project = make_project(tmp_path / "project", {"data": {"url": archive.as_uri()}})
    result = plain([str(dvc), "repro", "fetch"], project)
    # Without the fix, /bin/sh finds no `python` on this PATH (or another interpreter, without tqdm).
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'fetch'" in result.stdout and (project / "data/raw/dataset.zip").is_file()


def test_predict_and_check_metrics_are_commands_that_run_from_any_folder(tmp_path: Path) -> None:
    for command in ("tl-predict", "tl-check-metrics"):
        result = plain([str(VENV_BIN / command), "--help"], tmp_path)
        assert result.returncode == 0 and f"usage: {command}" in result.stdout, result.stderr
    missing = plain([str(VENV_BIN / "tl-predict"), "cat.jpg", "--model", str(tmp_path / "none.keras")], tmp_path)
    assert missing.returncode == 2 and str(tmp_path / "none.keras") in missing.stderr
