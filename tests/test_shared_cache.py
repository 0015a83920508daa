"""A team sharing a DVC remote computes nothing twice (docs/experiments.md, "Sharing the cache").

One member reproduces the pipeline (the session's gate run, tests/conftest.py `gate_run`, copied), commits it,
pushes the commit to a shared git repository and the outputs and run cache to an S3 remote (moto's server on
127.0.0.1). Another member clones, pulls and reproduces: DVC reruns no stage but fetch's check of data.url,
and every file the stages wrote is the first member's, byte for byte. An experiment goes the same way with
`dvc exp push` and `dvc exp pull`. Whether a stage's output is kept in git or in DVC's cache does not matter
here: the clone gets the one from git and the other from the remote. And a run never committed comes back from
the shared run cache: the fine-tuning a teammate already ran is restored, not trained again.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    add_s3_remote,
    cached_stages,
    create_bucket,
    dvc,
    run,
    s3_keys,
    set_s3_credentials,
    stages_run,
    without_timing,
)
from tlpipe.files import sha256_file

pytestmark = pytest.mark.slow  # runs DVC, and stages in subprocesses

# Every file a stage writes lies under these folders.
OUTPUT_FOLDERS = ("data", "models", "exports", "metrics", "reports")
EXPERIMENT = "confidence-90"
# What finetune writes: the model, its labels and temperature, the training log.
FINETUNE_OUTPUTS = ("models/finetuned.keras", "models/finetuned.labels.json", "metrics/finetune/metrics.json")


@dataclass(frozen=True)
class Team:
    origin: Path  # the shared git repository
    first: Path  # the member who ran the pipeline and pushed it
    endpoint: str
    bucket: str
    pushed: dict[str, str]  # what the stages wrote in `first`, as pushed: path -> sha256


def output_files(project: Path) -> dict[str, str]:
    """The sha256 of every file the stages wrote, by path (DVC's temporary download folders left out)."""
    files = (path for folder in OUTPUT_FOLDERS for path in (project / folder).rglob("*") if path.is_file())
    return {
        str(path.relative_to(project)): sha256_file(path)
        for path in sorted(files)
        if not any(part.startswith(".") for part in path.relative_to(project).parts)
    }


def clone(team: Team, path: Path) -> Path:
    """Another member's checkout of the shared repository, with its own keys to the remote and no cache."""
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], team.first).stdout.strip()
    run(["git", "clone", "-q", "--branch", branch, str(team.origin), str(path)], team.origin.parent)
    set_s3_credentials(path)
    return path


def share_run(run_dir: Path, endpoint: str, root: Path) -> Team:
    """A copy of the reproduced project `run_dir`, committed and pushed: the commit to a new shared git
    repository, the outputs and the run cache to a new bucket at `endpoint`."""
    first = Path(shutil.copytree(run_dir, root / "first", symlinks=True))
    bucket = create_bucket(endpoint, f"team-{uuid.uuid4().hex}")
    add_s3_remote(first, f"s3://{bucket}/cache", endpoint)
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "results"], first)
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], root)
    run(["git", "remote", "add", "origin", str(origin)], first)
    run(["git", "push", "-q", "origin", "HEAD"], first)
    dvc(first, "push", "--run-cache")
    return Team(origin, first, endpoint, bucket, output_files(first))


def back_to_pushed(team: Team) -> None:
    """Undo what an earlier test's experiment left in `first`'s workspace (DVC applies it there)."""
    run(["git", "checkout", "--", "."], team.first)
    dvc(team.first, "checkout", "--force")
    assert output_files(team.first) == team.pushed


def stages_with_changed_outputs(project: Path) -> set[str]:
    """The stages whose outputs `dvc status` finds missing or changed."""
    status = json.loads(dvc(project, "status", "--json").stdout)
    return {
        name for name, changes in status.items() if any("changed outs" in c for c in changes if isinstance(c, dict))
    }


@pytest.fixture(scope="module")
def team(gate_run: Path, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Team:
    return share_run(gate_run, s3_endpoint, tmp_path_factory.mktemp("team"))


def test_a_fresh_clone_pulls_every_output_and_reruns_nothing(team: Team, tmp_path: Path) -> None:
    keys = s3_keys(team.endpoint, team.bucket)
    assert any(key.startswith("cache/files/md5/") for key in keys), keys  # the outputs
    assert any(key.startswith("cache/runs/") for key in keys), keys  # the run cache
    second = clone(team, tmp_path / "second")
    # Without the remote's outputs, DVC would recompute at least every backbone's features.
    backbones = yaml.safe_load((second / "params.yaml").read_text())["backbones"]
    assert {f"features@{key}" for key in backbones} <= stages_with_changed_outputs(second)
    dvc(second, "pull")
    assert stages_with_changed_outputs(second) == set()
    assert stages_run(dvc(second, "repro").stdout) == {"fetch"}  # always_changed: it checks data.url
    assert output_files(second) == team.pushed
    assert run(["git", "status", "--porcelain"], second).stdout == ""  # dvc.lock and the git-kept outputs as pushed


def test_an_experiment_one_member_pushes_another_pulls_without_rerunning(team: Team, tmp_path: Path) -> None:
    back_to_pushed(team)
    result = dvc(team.first, "exp", "run", "--name", EXPERIMENT, "--set-param", "stats.confidence=0.9")
    assert "evaluate_model" in stages_run(result.stdout)
    experiment = output_files(team.first)
    assert experiment["metrics/model.json"] != team.pushed["metrics/model.json"]  # narrower intervals
    dvc(team.first, "exp", "push", "origin", EXPERIMENT)
    second = clone(team, tmp_path / "second")
    dvc(second, "exp", "pull", "origin", EXPERIMENT)
    dvc(second, "exp", "apply", EXPERIMENT)
    assert stages_run(dvc(second, "repro").stdout) == {"fetch"}
    assert output_files(second) == experiment


def test_a_run_one_member_pushed_is_restored_for_another_with_the_same_parameters(team: Team, tmp_path: Path) -> None:
    """The shared run cache: a teammate who sets the parameters another member already ran, with the same code
    and data, gets the fine-tuned model of that run from the remote instead of training it again. Stages that
    write a metrics file (kept in git) rerun: DVC pushes no uncached output, so it cannot restore them there."""
    back_to_pushed(team)
    change = "finetune.learning_rate=0.0001"
    ran = dvc(team.first, "exp", "run", "--set-param", change)
    assert "finetune" in stages_run(ran.stdout)
    expected = output_files(team.first)
    dvc(team.first, "push", "--run-cache")
    second = clone(team, tmp_path / "second")
    dvc(second, "pull", "--run-cache")
    # --pull: DVC fetches a run's outputs from the remote when it restores that run (pull fetches the records).
    result = dvc(second, "exp", "run", "--pull", "--set-param", change)
    assert "finetune" in cached_stages(result.stdout) and "finetune" not in stages_run(result.stdout)
    assert stages_run(result.stdout) <= {
        "fetch",
        "validate",
        "ship",
        "evaluate_model",
        "export",
        "model_card",
        "aggregate",
    }
    restored = output_files(second)
    assert {path: restored[path] for path in FINETUNE_OUTPUTS} == {path: expected[path] for path in FINETUNE_OUTPUTS}
    # evaluate_model ran again: the same numbers, but for its wall-clock images_per_second
    shipped = [
        {"model": json.loads((project / "metrics" / "model.json").read_text())} for project in (second, team.first)
    ]
    assert without_timing(shipped[0]) == without_timing(shipped[1])
