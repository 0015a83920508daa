"""What a change to the reproduced gate pipeline reruns, and that the same inputs give the same numbers.

Works on copies of the session's gate run (tests/conftest.py `gate_run`, which test_pipeline_e2e.py checks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    cached_stages,
    dvc,
    metric_files,
    report_files,
    run,
    stages_in_process,
    stages_run,
    training_logs,
    without_timing,
)
from tlpipe.paths import FINETUNED_LABELS

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses


@pytest.fixture(scope="module")
def project(gate_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(gate_run, tmp_path_factory.mktemp("changes") / "project", symlinks=True))


def test_changing_one_backbone_reruns_only_its_stages(project: Path) -> None:
    """Changing it back restores every stage from DVC's run cache (only validate, which checks params.yaml,
    and fetch's check run), with the same numbers to the last digit; and rerunning the head's training,
    its evaluation with intervals and cross-validation by force gives those numbers again."""
    before, logs_before = without_timing(metric_files(project)), training_logs(project)
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["backbones"]["resnet50"]["image_size"] = 40
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(project, "repro")
    finally:
        params_file.write_text(original)
    resnet50_stages = {"features@resnet50", "train@resnet50", "evaluate@resnet50", "crossval@resnet50"}
    # The audit reads the folders of every backbone's features (dvc.yaml says why): it reruns on the shipped
    # backbone's unchanged features, writes the same files, and so reruns no evaluation after it.
    assert stages_run(result.stdout) - {"fetch"} == {"validate", *resnet50_stages, "audit", "aggregate"}
    assert without_timing(metric_files(project)) != before
    restored = dvc(project, "repro")  # back to the committed parameters
    assert stages_run(restored.stdout) - {"fetch"} == {"validate"}
    assert {"features@resnet50", "train@resnet50", "aggregate"} <= cached_stages(restored.stdout)
    assert without_timing(metric_files(project)) == before
    assert training_logs(project) == logs_before
    for stage in ("crossval@resnet50", "train@resnet50", "evaluate@resnet50"):  # in the order DVC runs them
        assert stages_run(dvc(project, "repro", "--force", "--single-item", stage).stdout) == {stage}
    assert without_timing(metric_files(project)) == before
    assert training_logs(project) == logs_before


def test_fine_tuning_rerun_by_force_gives_the_same_losses(gate_run: Path, tmp_path: Path) -> None:
    """The same losses at every epoch and the same temperature fitted on val; the frozen path's stages get
    this check in test_changing_one_backbone_reruns_only_its_stages."""
    copy = Path(shutil.copytree(gate_run, tmp_path / "copy", symlinks=True))
    stages_in_process(copy, ("finetune",))  # what `dvc repro --force --single-item finetune` runs
    assert training_logs(copy) == training_logs(gate_run)
    labels = [json.loads((project / FINETUNED_LABELS).read_text()) for project in (copy, gate_run)]
    assert labels[0] == labels[1] and "temperature_p_value" in labels[0]


def test_exp_run_with_another_model_reruns_only_the_shipping_stages(project: Path) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline results", "--allow-empty"], project)
    result = dvc(project, "exp", "run", "-S", "model=resnet50")
    shipping = {"finetune", "ship", "evaluate_model", "export", "model_card", "aggregate"}
    # audit.backbone is null: the audit follows model to resnet50's features; its list of dropped test images
    # stays empty (audit.leakage: report), so no evaluation of a frozen backbone reruns.
    assert stages_run(result.stdout) - {"fetch"} == {"validate", "audit", *shipping}
    assert "audit (resnet50 features" in result.stderr
    assert json.loads((project / "metrics/model.json").read_text())["backbone"] == "resnet50"
    exports = json.loads((project / "metrics/export.json").read_text())
    assert exports["backbone"] == "resnet50" and exports["failed"] == {} and exports["saved_model"]["agreement"] == 1.0
    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    assert "metrics/model.json" in diff


def test_switching_model_back_restores_every_stage_from_the_run_cache(gate_run: Path, tmp_path: Path) -> None:
    """Away and back, by `dvc exp run -S` and by editing params.yaml before `dvc repro`: what was computed
    once is restored, the fine-tuning above all; only fetch's check, validate and ship run, and every
    metric and report is the one of the first run."""
    copy = Path(shutil.copytree(gate_run, tmp_path / "copy", symlinks=True))
    run(["git", "add", "-A"], copy)
    run(["git", "commit", "-qm", "baseline results", "--allow-empty"], copy)
    first, reports = metric_files(copy), report_files(copy)
    original = yaml.safe_load((copy / "params.yaml").read_text())["model"]
    always = {"fetch", "validate", "ship"}

    away = dvc(copy, "exp", "run", "-S", "model=resnet50")
    assert "finetune" in stages_run(away.stdout)
    back = dvc(copy, "exp", "run", "-S", f"model={original}")
    assert stages_run(back.stdout) <= always
    assert {"finetune", "evaluate_model", "export", "model_card", "aggregate", "audit"} <= cached_stages(back.stdout)
    assert metric_files(copy) == first and report_files(copy) == reports

    for model in ("resnet50", original):  # plain repro after an edit: both runs are in the run cache now
        params = yaml.safe_load((copy / "params.yaml").read_text())
        params["model"] = model
        (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert stages_run(dvc(copy, "repro").stdout) <= always
    assert metric_files(copy) == first and report_files(copy) == reports


def test_a_changed_list_of_dropped_test_images_reruns_every_evaluation(gate_run: Path, tmp_path: Path) -> None:
    """audit.leakage: drop changes data/audit/dropped_test.csv, which every evaluation reads (the gate's random
    features make every test image a near copy, so the list is the whole test split: only DVC's status is
    checked here; tests/test_audit_planted.py runs the evaluations on real photos)."""
    copy = Path(shutil.copytree(gate_run, tmp_path / "copy", symlinks=True))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["audit"]["leakage"] = "drop"
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(copy, "repro", "audit").stdout) - {"fetch"} == {"validate", "audit"}
    status = json.loads(dvc(copy, "status", "--json").stdout)
    stale = {
        stage
        for stage, changes in status.items()
        if any(
            "data/audit/dropped_test.csv" in (change.get("changed deps") or {})
            for change in changes
            if isinstance(change, dict)
        )
    }
    assert stale == {"evaluate@resnet50", "evaluate@inception", "evaluate_model", "export"}, status
