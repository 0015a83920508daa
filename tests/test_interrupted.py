"""Killed runs leave nothing half-written, and the next `dvc repro` recomputes what was lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.helpers import dvc, one_backbone_project, run
from tests.synthetic import write_dataset_zip
from tlpipe.files import atomic_path, write_json

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses


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


def repro_killed_mid_stage(project: Path, stage: str, target: str, during: Callable[[], None] = lambda: None) -> None:
    """Run `dvc repro target`, wait until `stage` has started working, call `during`, then SIGKILL it all."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
    }
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", target],
        cwd=project,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in repro.stdout:  # wait until the stage under test has started working
            if f"Running stage '{stage}'" in line:
                break
        time.sleep(3.0)
        assert repro.poll() is None, "the stage finished before it could be killed; give it more work"
        during()
    finally:
        os.killpg(repro.pid, signal.SIGKILL)  # the whole group: dvc and the stage it started
        repro.wait()


# Killed in turn, on one project: each stage's run starts from what the one before recomputed.
KILLED_OUTPUTS = {
    "features@mobilenet": ["data/features/mobilenet"],
    "train@mobilenet": ["models/mobilenet/head.keras", "metrics/train/mobilenet"],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interrupted")
    archive = write_dataset_zip(root / "images.zip", n_train=40, n_test=10, size=48)
    return one_backbone_project(
        root / "project",
        archive.as_uri(),
        "mobilenet",
        "MobileNetV2",
        32,
        finetune={"unfreeze": 10, "epochs": 1, "batch_size": 8, "patience": 1},
        # A validation split this small would ship the frozen head without fine-tuning: let it decide here,
        # where a long fine-tune is what gets killed.
        train={"min_val_per_class": 0},
    )


def test_a_stage_killed_mid_run_is_recomputed(project: Path) -> None:
    for stage, outputs in KILLED_OUTPUTS.items():
        repro_killed_mid_stage(project, stage, stage)
        assert not any((project / output).exists() for output in outputs), stage
        status = dvc(project, "status", stage).stdout
        assert stage in status
        result = dvc(project, "repro", stage)
        assert f"Running stage '{stage}'" in result.stdout
        assert all((project / output).exists() for output in outputs), stage
        assert leftovers(project) == [], stage


def test_the_shipped_model_stays_while_a_new_one_trains_and_after_it_is_killed(project: Path) -> None:
    """After the test above (module order), so that only fine-tuning and shipping are left to run."""
    dvc(project, "repro", "ship")  # evaluations are not needed here
    shipped = {name: (project / "models" / name).read_bytes() for name in ("model.keras", "labels.json")}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"] |= {"epochs": 200, "patience": 200}  # a new, long fine-tune: early stopping must not end it
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    image = next((project / "data/prepared").rglob("*.jpg"))

    def predict_works() -> None:
        for name, content in shipped.items():
            assert (project / "models" / name).read_bytes() == content, name
        result = run([sys.executable, "-m", "stages.predict", str(image)], project)
        assert result.stdout.count("\t") == 2

    repro_killed_mid_stage(project, "finetune", "ship", during=predict_works)
    assert not (project / "models/finetuned.keras").exists()  # DVC removed finetune's own output
    for name, content in shipped.items():  # the files predict just worked with, untouched by the kill
        assert (project / "models" / name).read_bytes() == content, name
    assert "finetune" in dvc(project, "status", "finetune").stdout


def test_the_recovery_hint_names_dvc_checkout_only_where_dvc_removed_outputs(tmp_path: Path) -> None:
    from tlpipe.errors import recovery_hint, removes_outputs

    dvc_yaml = Path(__file__).resolve().parents[1] / "dvc.yaml"
    assert [removes_outputs(stage, dvc_yaml) for stage in ("validate", "fetch", "ship")] == [False, False, False]
    assert all(removes_outputs(stage, dvc_yaml) for stage in ("prepare", "features@vgg16", "finetune", "aggregate"))
    assert removes_outputs("prepare", tmp_path / "no-dvc.yaml")  # cannot tell: say it
    assert recovery_hint(None) == ""
    assert "`dvc checkout train@vgg16` restores" in recovery_hint("train@vgg16")
