"""The regression gate on a real git + DVC repository: exit codes 0, 1 and 2 and the table's rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT, make_project, run
from tlpipe.gate import judge, judge_all, tolerance

SCORES = {
    "accuracy": 0.98,
    "precision": 0.97,
    "recall": 0.99,
    "f1": 0.98,
    "roc_auc": 0.995,
    "loss": 0.06,
    "n_test": 1000,
    "params": 14714688,
    "images_per_second": 15.2,
}


def write_metrics(project: Path, name: str, **changes: object) -> None:
    scores = {k: v for k, v in (SCORES | changes).items() if v is not None}
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / f"{name}.json").write_text(json.dumps(scores))


def gate(project: Path, *args: str):
    return run([sys.executable, "-m", "stages.check_metrics", *args], project, check=False)


def table_row(output: str, metric: str, backbone: str) -> list[str]:
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [metric, backbone]:
            return cells
    raise AssertionError(f"no row for {metric} of {backbone} in\n{output}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC repository with committed metrics: the tests using it run DVC (slow)."""
    project = make_project(tmp_path / "project", {})
    write_metrics(project, "vgg16")
    write_metrics(project, "mobilenet", accuracy=0.99)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline metrics"], project)
    return project


@pytest.mark.slow
def test_unchanged_metrics_pass(project: Path) -> None:
    result = gate(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, "accuracy", "vgg16")[2:] == ["0.9800", "0.9800", "+0.0000", "drop ≤ 0.01", "ok"]
    assert "no regressions" in result.stdout


@pytest.mark.slow
def test_an_accuracy_drop_beyond_tolerance_fails_with_its_row(project: Path) -> None:
    write_metrics(project, "vgg16", accuracy=0.95)
    result = gate(project)
    assert result.returncode == 1
    assert table_row(result.stdout, "accuracy", "vgg16")[2:] == [
        "0.9800",
        "0.9500",
        "-0.0300",
        "drop ≤ 0.01",
        "**REGRESSED**",
    ]
    assert table_row(result.stdout, "accuracy", "mobilenet")[-1] == "ok"
    assert "**1 regressed**" in result.stdout


@pytest.mark.slow
def test_a_drop_within_tolerance_and_ignored_timing_pass(project: Path) -> None:
    write_metrics(project, "vgg16", accuracy=0.975, images_per_second=3.0)
    result = gate(project)
    assert result.returncode == 0, result.stdout
    assert table_row(result.stdout, "images_per_second", "vgg16")[-1] == "ignored"


@pytest.mark.slow
def test_a_loss_rise_fails(project: Path) -> None:
    write_metrics(project, "mobilenet", accuracy=0.99, loss=0.2)
    result = gate(project)
    assert result.returncode == 1
    assert table_row(result.stdout, "loss", "mobilenet")[-2:] == ["rise ≤ 0.05", "**REGRESSED**"]


@pytest.mark.slow
def test_new_backbones_and_metrics_are_reported_not_failed(project: Path) -> None:
    write_metrics(project, "vgg16", balanced_accuracy=0.97)
    write_metrics(project, "resnet50")
    dvc_yaml = project / "dvc.yaml"  # resnet50 is in params.yaml already, so its metrics file is declared
    assert "${key}.json" in dvc_yaml.read_text()
    result = gate(project)
    assert result.returncode == 0, result.stdout
    assert table_row(result.stdout, "accuracy", "resnet50")[2:] == ["–", "0.9800", "", "drop ≤ 0.01", "new"]
    assert table_row(result.stdout, "balanced_accuracy", "vgg16")[-1] == "new"


@pytest.mark.slow
def test_a_metric_that_disappears_fails(project: Path) -> None:
    write_metrics(project, "vgg16", roc_auc=None)
    result = gate(project)
    assert result.returncode == 1
    assert table_row(result.stdout, "roc_auc", "vgg16")[-1] == "**MISSING**"


@pytest.mark.slow
def test_an_unknown_baseline_exits_2_with_one_line(project: Path) -> None:
    result = gate(project, "--baseline", "no-such-ref")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no-such-ref" in result.stderr and result.stderr.startswith("error: baseline")


@pytest.mark.slow
def test_a_baseline_without_metrics_exits_2_and_says_what_to_commit(project: Path) -> None:
    result = gate(project, "--baseline", "HEAD~1")
    assert result.returncode == 2
    assert "has no metrics to compare with" in result.stderr and "git commit" in result.stderr


@pytest.mark.slow
def test_removed_metrics_are_missing_not_regressed(project: Path) -> None:
    for path in (project / "metrics").glob("*.json"):
        path.unlink()
    result = gate(project)
    assert result.returncode == 1
    assert "**18 missing**" in result.stdout and "regressed" not in result.stdout
    assert "run dvc repro" in result.stdout
    assert table_row(result.stdout, "accuracy", "vgg16")[-1] == "**MISSING**"


@pytest.mark.slow
def test_a_drop_and_a_missing_metric_are_counted_apart(project: Path) -> None:
    write_metrics(project, "vgg16", accuracy=0.95, roc_auc=None)
    result = gate(project)
    assert "**1 regressed**, **1 missing**" in result.stdout


def test_judge_rules() -> None:
    assert judge("loss", "x", 0.1, 0.12, {"max_rise": 0.05}).verdict == "ok"
    assert judge("f1", "x", 0.9, 0.8, {"max_drop": 0.05}).verdict == "REGRESSED"
    assert judge("f1", "x", 0.9, 0.95, {"max_drop": 0.05}).verdict == "ok"
    assert judge("best", "summary", "vgg16", "mobilenet", {"max_drop": 0.01}).verdict == "changed"


def test_noise_interval_lets_a_drop_inside_the_baselines_interval_pass() -> None:
    rule = {"max_drop": 0.01, "noise": "interval"}
    interval = (0.95, 0.99)  # the baseline's accuracy_ci_low and accuracy_ci_high
    assert judge("accuracy", "x", 0.97, 0.955, rule, interval).verdict == "ok"  # a 0.015 drop, inside
    assert judge("accuracy", "x", 0.97, 0.94, rule, interval).verdict == "REGRESSED"  # below the interval
    assert judge("accuracy", "x", 0.97, 0.955, {"max_drop": 0.01}, interval).verdict == "REGRESSED"  # rule off
    assert judge("accuracy", "x", 0.97, 0.955, rule, None).verdict == "REGRESSED"  # no interval: tolerance only


def test_noise_interval_reads_the_baseline_interval_from_the_same_file() -> None:
    diff = {
        "metrics/vgg16.json": {
            "accuracy": {"old": 0.97, "new": 0.955},
            "accuracy_ci_low": {"old": 0.95, "new": 0.93},
            "accuracy_ci_high": {"old": 0.99, "new": 0.97},
        },
        "metrics/resnet50.json": {"accuracy": {"old": 0.97, "new": 0.955}},  # no interval to judge by
    }
    rules = {
        "default": {"max_drop": 0.01},
        "accuracy": {"max_drop": 0.01, "noise": "interval"},
        "*_ci_*": {"ignore": True},
    }
    verdicts = {(row.backbone, row.metric): row.verdict for row in judge_all(diff, rules)}
    assert verdicts == {
        ("vgg16", "accuracy"): "ok",
        ("vgg16", "accuracy_ci_low"): "ignored",
        ("vgg16", "accuracy_ci_high"): "ignored",
        ("resnet50", "accuracy"): "REGRESSED",
    }


def test_rules_by_exact_name_then_pattern_then_default() -> None:
    rules = {"default": {"max_drop": 0.01}, "*p_value": {"ignore": True}, "ece": {"max_rise": 0.02}}
    assert tolerance("backbones.vgg16.frozen_p_value", rules) == {"ignore": True}
    assert tolerance("ece", rules) == {"max_rise": 0.02}
    assert tolerance("accuracy", rules) == {"max_drop": 0.01}
    shipped = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["regression"]
    assert tolerance("accuracy_ci_low", shipped) == {"ignore": True}
    assert tolerance("only_frozen_right", shipped) == {"ignore": True}
    assert tolerance("ece_calibrated", shipped) == {"max_rise": 0.02}
