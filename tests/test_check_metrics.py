"""The regression gate on a real git + DVC repository: exit codes 0, 1 and 2 and the table's rows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from stages.check_metrics import main
from tests.helpers import PROJECT_ROOT, make_project, run
from tlpipe.gate import diff_files, judge, judge_all, markdown, split_files, tolerance

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
    (project / "metrics" / f"{name}.json").write_text(json.dumps(scores))  # NaN and inf as Python's json writes them


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


@pytest.mark.slow
def test_nan_inf_and_text_metrics_fail_with_their_reason(project: Path) -> None:
    write_metrics(project, "vgg16", accuracy=math.nan, loss=math.inf)
    write_metrics(project, "mobilenet", accuracy=0.99, roc_auc="abc")
    result = gate(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "**3 regressed**" in result.stdout
    assert table_row(result.stdout, "accuracy", "vgg16")[-1] == "**REGRESSED** (new value not a finite number: nan)"
    assert table_row(result.stdout, "loss", "vgg16")[-1] == "**REGRESSED** (new value not a finite number: inf)"
    assert table_row(result.stdout, "roc_auc", "mobilenet")[-1] == "**REGRESSED** (new value not a number: 'abc')"


@pytest.mark.slow
def test_a_nan_in_the_baseline_fails(project: Path) -> None:
    write_metrics(project, "vgg16", accuracy=math.nan)
    run(["git", "commit", "-qam", "a NaN baseline"], project)
    write_metrics(project, "vgg16")
    result = gate(project)
    assert result.returncode == 1
    assert (
        table_row(result.stdout, "accuracy", "vgg16")[-1] == "**REGRESSED** (baseline value not a finite number: nan)"
    )


@pytest.mark.slow
def test_an_unreadable_metrics_file_is_one_line_naming_it_and_fails(project: Path) -> None:
    (project / "metrics" / "vgg16.json").write_text('{"accuracy": 0.9,')
    result = gate(project)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: metrics/vgg16.json cannot be read (JSON file structure is corrupted); "
        "rerun the stage that writes it (dvc repro)"
    ]
    assert "**1 unreadable file**" in result.stdout and "missing" not in result.stdout
    assert table_row(result.stdout, "accuracy", "mobilenet")[-1] == "ok"  # the readable files are still judged


@pytest.mark.slow
def test_an_unreadable_baseline_file_exits_2_naming_it(project: Path) -> None:
    (project / "metrics" / "vgg16.json").write_text("[not json")
    run(["git", "commit", "-qam", "a damaged baseline"], project)
    write_metrics(project, "vgg16")
    result = gate(project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: baseline 'HEAD': metrics/vgg16.json cannot be read (JSON file structure is corrupted); "
        "choose another --baseline"
    ]


@pytest.mark.parametrize("baseline", ["--help", "-x", "--output=/tmp/x", "", "  "])
def test_a_baseline_that_is_an_option_or_empty_is_refused_with_one_line(
    baseline: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([f"--baseline={baseline}"]) == 2  # refused before params.yaml or any repository is read
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: --baseline")


def test_a_usage_mistake_is_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--baseline"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --baseline: expected one argument (see tl-check-metrics --help)"
    ]


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (0.9, math.nan, "new value not a finite number: nan"),
        (0.9, math.inf, "new value not a finite number: inf"),
        (0.9, -math.inf, "new value not a finite number: -inf"),
        (math.nan, 0.9, "baseline value not a finite number: nan"),
        (math.nan, math.nan, "baseline value not a finite number: nan"),
        (0.9, "abc", "new value not a number: 'abc'"),
        ("abc", 0.9, "baseline value not a number: 'abc'"),
        (0.9, True, "new value not a number: True"),
        (None, math.nan, "new value not a finite number: nan"),  # a new metric that is NaN
        pytest.param(0.9, 10**400, "new value too large to compare: 1" + "0" * 38 + "…", id="a 401-digit integer"),
    ],
)
def test_values_that_cannot_be_compared_regress_with_their_reason(old: object, new: object, reason: str) -> None:
    row = judge("accuracy", "x", old, new, {"max_drop": 0.01})
    assert (row.verdict, row.reason, row.change) == ("REGRESSED", reason, None)


def test_names_are_compared_as_names_and_ignored_metrics_are_never_judged() -> None:
    assert judge("best", "summary", "vgg16", "vgg16", {"max_drop": 0.01}).verdict == "ok"
    assert judge("best", "summary", None, "vgg16", {"max_drop": 0.01}).verdict == "new"
    assert judge("images_per_second", "x", 15.0, math.nan, {"ignore": True}).verdict == "ignored"
    assert judge("accuracy", "x", math.nan, None, {"max_drop": 0.01}).verdict == "MISSING"


def test_dvc_results_split_into_metrics_absent_files_and_unreadable_ones() -> None:
    class JSONFileCorruptedError(Exception):  # DVC's, by name: its message starts with DVC's own relative path
        pass

    result = {
        "data": {
            "metrics/vgg16.json": {"data": {"accuracy": 0.9, "backbones": {"vgg16": {"f1": 0.8}}}},
            "metrics/resnet50.json": {"error": FileNotFoundError(2, "No such file or directory")},
            "metrics/effnet.json": {
                "error": JSONFileCorruptedError(
                    "unable to read: '../../metrics/effnet.json', JSON file structure is corrupted"
                )
            },
            "metrics/model.json": {"data": 5},
        }
    }
    files, errors = split_files(result)
    assert files == {"metrics/vgg16.json": {"accuracy": 0.9, "backbones.vgg16.f1": 0.8}}
    assert errors == {
        "metrics/effnet.json": "JSON file structure is corrupted",
        "metrics/model.json": "holds int, not a mapping of metrics",
    }
    old = {"metrics/vgg16.json": {"accuracy": 0.95}, "metrics/effnet.json": {"accuracy": 0.9}}
    assert diff_files(old, files, skip=set(errors)) == {
        "metrics/vgg16.json": {
            "accuracy": {"old": 0.95, "new": 0.9},
            "backbones.vgg16.f1": {"old": None, "new": 0.8},
        }
    }


def test_table_cells_keep_their_row_whatever_the_values_hold() -> None:
    rows = judge_all({"metrics/x.json": {"a|b": {"old": "one\nline|two", "new": "one\nline|two"}}}, {"default": {}})
    table = markdown(rows, "main`", {"metrics/y.json": "bad | worse"})
    assert "| a\\|b | x | one\\nline\\|two | one\\nline\\|two |" in table
    assert table.startswith("### Metrics against `` main` ``: **1 unreadable file**")
    assert "metrics/y.json cannot be read (bad \\| worse)" in table
