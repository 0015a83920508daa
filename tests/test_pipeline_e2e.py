"""End to end: `dvc repro` on CI's gate configuration (a synthetic two-class zip, ResNet50 and InceptionV3
randomly initialised, InceptionV3 fine-tuned and shipped).

The session's one pipeline run (tests/conftest.py `gate_run`, copied here) is checked by several tests, the
metric gate first; test_pipeline_changes.py checks what changes to it rerun.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.ci_gate import check_against_baseline
from tests.helpers import dvc, run, stages_run
from tests.test_dependencies import params_problems
from tests.test_model_card import assert_card_matches_its_sources

pytestmark = pytest.mark.slow  # runs DVC or whole stages in subprocesses

# CI's gate configuration: two of the five default backbones (test_backbones.py builds all five), the two
# whose random features separate the synthetic colours, InceptionV3 fine-tuned and shipped.
BACKBONES = yaml.safe_load((Path(__file__).parent / "gate" / "params.yaml").read_text())["backbones"]
METRIC_KEYS = {"accuracy", "precision", "recall", "f1", "roc_auc", "loss", "n_test", "params", "images_per_second"}
# What every evaluation adds for trust: intervals (uncalibrated scores) and calibration before and after scaling.
TRUST_KEYS = {
    *(f"{metric}_ci_{end}" for metric in ("accuracy", "f1", "roc_auc") for end in ("low", "high")),
    "ece",
    "ece_calibrated",
    "brier",
    "brier_calibrated",
    "loss_calibrated",
    "temperature",
    "temperature_fitted",
    "temperature_p_value",
}


@pytest.fixture(scope="module")
def project(gate_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's gate run (tests/conftest.py), copied: tests below change parameters and commit."""
    return Path(shutil.copytree(gate_run, tmp_path_factory.mktemp("e2e") / "project", symlinks=True))


def test_no_metric_regressed_against_the_committed_baseline(project: Path) -> None:
    """CI's metric gate (python -m tests.ci_gate), on the session's run, before the tests below change it."""
    gate = check_against_baseline(project)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "no regressions" in gate.stdout


def test_every_stage_writes_its_outputs(project: Path) -> None:
    keys = list(BACKBONES)
    assert (project / "data/raw/dataset.zip").is_file()
    manifest = pd.read_csv(project / "data/prepared/manifest.csv")
    assert manifest.groupby("split").size().to_dict() == {"train": 48, "val": 12, "test": 30}
    for key in keys:
        assert (project / f"data/features/{key}/features.npz").is_file()
        assert (project / f"models/{key}/head.keras").is_file()
        metrics = json.loads((project / f"metrics/{key}.json").read_text())
        assert METRIC_KEYS | TRUST_KEYS <= metrics.keys(), key
        assert metrics["n_test"] == 30 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["params"] > 0
        assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"], key
        # Deployment cost: the float32 base's weights file plus the head's, and one image's latency.
        assert metrics["size_bytes"] > 4 * metrics["params"] > 0, key
        assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"], key
        crossval = json.loads((project / f"metrics/crossval/{key}.json").read_text())
        assert 0 <= crossval["cv_accuracy_mean"] <= 1 and crossval["cv_accuracy_std"] >= 0
        ran = {k: crossval[k] for k in ("folds", "repeats", "folds_requested", "folds_note", "unfolded_classes")}
        assert ran == {"folds": 5, "repeats": 2, "folds_requested": 5, "folds_note": "", "unfolded_classes": ""}
        assert len(pd.read_csv(project / f"reports/evaluation/{key}/per_class.csv")) == 2
        out_of_fold = pd.read_csv(project / f"reports/crossval/{key}/out_of_fold.csv")
        assert len(out_of_fold) == 60 and set(out_of_fold["split"]) == {"train", "val"}
        assert np.allclose(out_of_fold[["probability_cats", "probability_dogs"]].sum(axis=1), 1.0, atol=1e-5)
        assert json.loads((project / f"metrics/train/{key}/metrics.json").read_text())["step"] >= 0
        assert len(json.loads((project / f"reports/evaluation/{key}/confusion.json").read_text())) == 30
        assert json.loads((project / f"reports/evaluation/{key}/roc.json").read_text())
        for picture in ("confusion.png", "roc.png", "errors.png", "reliability.png"):
            assert (project / f"reports/evaluation/{key}/{picture}").read_bytes()[:4] == b"\x89PNG"
        assert (project / f"reports/training/{key}.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(project / "reports/comparison.csv")
    assert sorted(table["backbone"]) == sorted([*keys, "model"])
    assert list(table["accuracy"]) == sorted(table["accuracy"], reverse=True)
    assert (project / "reports/comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "reports/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table[["size_bytes", "latency_ms_p50", "latency_ms_p95"]].notna().all().all()
    assert "| backbone" in (project / "reports/comparison.md").read_text()
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["best"] == table["backbone"][0] and set(summary["backbones"]) == {*keys, "model"}
    assert table["verdict"][0] == "best" and set(table["verdict"][1:]) <= {"tied with best", "worse"}
    tied = list(table["backbone"][table["verdict"] == "tied with best"])
    assert summary["tied_with_best"] == ", ".join(tied)
    assert summary["recommended"] in keys and summary["recommended_reason"].startswith(summary["recommended"])
    audit = json.loads((project / "metrics/audit.json").read_text())
    assert audit["audited_images"] == 90 and audit["label_issues_checked"] == 60
    for listed in ("duplicates.csv", "leakage.csv", "label_issues.csv", "outliers.csv"):
        assert (project / "reports/audit" / listed).is_file(), listed
    card = (project / "reports/model_card.md").read_text()
    assert "From `inception` features" in card  # audit.backbone is null: the shipped backbone's
    assert json.loads((project / "data/raw/source.json").read_text())["sha256"] in card
    model, exports = (json.loads((project / f"metrics/{name}.json").read_text()) for name in ("model", "export"))
    assert_card_matches_its_sources(card, model, audit, exports)
    # The gate exports what tests/gate/params.yaml asks for; each runs in its runtime and agrees with .keras.
    assert exports["failed"] == {} and exports["n_test"] == 30 and exports["keras"]["accuracy"] == model["accuracy"]
    assert exports["saved_model"]["agreement"] == 1.0 and exports["saved_model"]["max_probability_difference"] <= 1e-5
    assert sorted(p.name for p in (project / "exports").iterdir()) == ["labels.json", "saved_model"]


# Parameters a stage reads only in a configuration other than this test's.
CONDITIONAL_READS = {
    "distribute.cpu_replicas": "read only under distribute.strategy: mirrored (test_distribute.py)",
    "features.ray": "read only under features.engine: ray (test_ray_engine.py)",
    **{
        f"train.{name}": "read only under train.head: keras (test_many_classes.py, test_crossval.py)"
        for name in ("epochs", "batch_size", "learning_rate", "hidden_units", "patience")
    },
}
# Sections a stage declares whole though it reads one entry, because the entry is chosen at run time.
CHOSEN_AT_RUN_TIME = {
    "audit": ["backbones"],  # the audited backbone: audit.backbone, or model's where null (dvc.yaml says why)
}


def declared_params(stage: str, params: dict) -> list[str]:
    """The `params:` of a stage in dvc.yaml, with ${key} (foreach) and ${model}... filled in."""
    name, _, key = stage.partition("@")
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"][name]
    entries = spec.get("do", spec).get("params", [])

    def value(match: re.Match) -> str:
        found: Any = params
        for part in match.group(1).split("."):
            found = found[part]
        return str(found)

    return [re.sub(r"\$\{([\w.]+)\}", value, entry.replace("${key}", key)) for entry in entries]


def test_each_stage_declares_exactly_the_parameters_it_reads(gate_run: Path) -> None:
    """A parameter a stage reads but does not declare would not rerun it; one it declares but never reads
    would rerun it for nothing (tuning fine-tuning's augmentation must not rerun feature extraction)."""
    params = yaml.safe_load((gate_run / "params.yaml").read_text())
    traces = [json.loads(p.read_text()) for p in sorted((gate_run.parent / "params-read").glob("*.json"))]
    stages = {trace["stage"] for trace in traces}
    assert {
        "fetch",
        "prepare",
        "features@inception",
        "train@inception",
        "evaluate@resnet50",
        "crossval@inception",
        "audit",
        "finetune",
        "evaluate_model",
        "aggregate",
    } <= stages, stages
    problems = []
    for trace in traces:
        declared = declared_params(trace["stage"], params)
        # A conditional read counts where the stage declares it (it needs it in the other configuration).
        conditional = [
            name
            for name in CONDITIONAL_READS
            if any(name == entry or name.startswith(f"{entry}.") for entry in declared)
        ]
        chosen = [
            f"{section}.{entry}" for section in CHOSEN_AT_RUN_TIME.get(trace["stage"], []) for entry in params[section]
        ]
        problems += params_problems(trace["stage"], declared, trace["reads"] + conditional + chosen, params)
    assert not problems, "\n".join(problems)


def test_separable_classes_are_learned(project: Path) -> None:
    """Even random ResNet50/InceptionV3 features separate the synthetic colours; a broken head would not."""
    for key in ("resnet50", "inception"):
        assert json.loads((project / f"metrics/{key}.json").read_text())["accuracy"] >= 0.8, key


def test_second_repro_does_nothing(project: Path) -> None:
    result = dvc(project, "repro")
    # fetch checks its source on every run (always_changed) and leaves the unchanged archive as it is.
    assert stages_run(result.stdout) == {"fetch"}
    assert "fetch: unchanged" in result.stderr and "Stage 'prepare' didn't change, skipping" in result.stdout
    assert json.loads(dvc(project, "status", "--json").stdout) == {"fetch": ["always changed"]}


def test_dvc_metrics_and_plots_list_every_backbone(project: Path) -> None:
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {f"metrics/{key}.json" for key in BACKBONES} | {"metrics/summary.json"} <= files.keys()
    plots = dvc(project, "plots", "show", "--json").stdout
    for key in BACKBONES:
        assert f"metrics/train/{key}/plots/metrics" in plots
        assert f"reports/evaluation/{key}/confusion.json" in plots
        assert f"reports/evaluation/{key}/roc.json" in plots
        assert f"reports/evaluation/{key}/errors.png" in plots


def test_the_shipped_model_is_scored_and_ranked(project: Path) -> None:
    labels = json.loads((project / "models/labels.json").read_text())
    assert labels["classes"] == ["cats", "dogs"] and labels["backbone"] == "inception"
    model_metrics = json.loads((project / "metrics/model.json").read_text())
    assert METRIC_KEYS | TRUST_KEYS | {"backbone"} <= model_metrics.keys() and model_metrics["backbone"] == "inception"
    # The temperature predict applies is the one finetune fitted on val and shipped in labels.json.
    assert model_metrics["temperature"] == labels["temperature"] > 0
    assert model_metrics["temperature_p_value"] == labels["temperature_p_value"]
    # Fine-tuned against frozen, on the same images: the paired test's numbers agree with both metrics files.
    assert model_metrics["frozen_accuracy"] == json.loads((project / "metrics/inception.json").read_text())["accuracy"]
    assert model_metrics["frozen_difference"] == pytest.approx(
        model_metrics["accuracy"] - model_metrics["frozen_accuracy"]
    )
    assert model_metrics["fine_tuning"] in {"helped", "hurt", "tied"}
    assert (model_metrics["frozen_p_value"] >= 0.05) == (model_metrics["fine_tuning"] == "tied")
    frozen = json.loads((project / "metrics/inception.json").read_text())
    assert model_metrics["n_test"] == 30
    # Same base (seeded even when random), same head: fine-tuning starts from the frozen row and keeps
    # the frozen weights unless validation improves, so it cannot fall far behind.
    assert model_metrics["accuracy"] >= frozen["accuracy"] - 0.1
    assert (project / "metrics/finetune/metrics.json").is_file()
    # Validation (6 images per class, tests/gate/params.yaml) decides: the log and the metrics say what shipped.
    assert model_metrics["shipped"] == ("fine-tuned" if labels["fine_tuned"] else "frozen")
    assert model_metrics["shipped_reason"] == labels["shipped_reason"]
    assert model_metrics["shipped_reason"].startswith("fine-tuning ")  # lowered, or raised: from val losses
    assert model_metrics["temperature_source"] == labels["temperature_source"] == "validation"


def test_shipped_model_loads_in_a_fresh_process_and_predicts(project: Path, tmp_path: Path) -> None:
    """Plain keras.models.load_model, no project code: resizing and preprocessing live inside the model."""
    script = (
        "import sys, numpy as np, keras\n"
        "model = keras.models.load_model('models/model.keras')\n"
        "out = model.predict(np.full((1, 57, 91, 3), 128.0, 'float32'), verbose=0)\n"
        "print(out.shape, float(out.min()), float(out.max()))\n"
    )
    result = run([sys.executable, "-c", script], project)
    shape, low, high = result.stdout.split(")")[0] + ")", *map(float, result.stdout.split(")")[1].split())
    assert shape == "(1, 1)" and 0.0 <= low <= high <= 1.0


def test_the_shipped_model_is_a_registry_artifact(project: Path, tmp_path: Path) -> None:
    """dvc.yaml's `artifacts:` entry: once a version is registered (an annotated GTO tag, what `gto register`
    and Studio write), `dvc artifacts get` downloads the shipped model, and `dvc get` its labels."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results", "--allow-empty"], project)
    run(["git", "tag", "-a", "image-classifier@v1.0.0", "-m", "Registering artifact image-classifier v1.0.0"], project)
    shown = yaml.safe_load((project / "dvc.yaml").read_text())["artifacts"]["image-classifier"]
    assert shown["type"] == "model" and shown["path"] == "models/model.keras"
    dvc(project, "artifacts", "get", ".", "image-classifier", "-o", str(tmp_path / "model.keras"))
    dvc(
        project,
        "get",
        ".",
        "models/labels.json",
        "--rev",
        "image-classifier@v1.0.0",
        "-o",
        str(tmp_path / "labels.json"),
    )
    assert (tmp_path / "model.keras").read_bytes() == (project / "models/model.keras").read_bytes()
    assert (tmp_path / "labels.json").read_bytes() == (project / "models/labels.json").read_bytes()


def test_predict_reports_each_file_and_goes_on(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The pipeline's shipped model through predict's command line, run in this process (predict as a
    command of its own is tested by test_install.py and the test below)."""
    from stages.predict import main as predict
    from tests.synthetic import encode, synthetic_image

    rng = np.random.default_rng(7)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for index, name in enumerate(["cats", "dogs"]):
        (folder / f"{name}.png").write_bytes(encode(synthetic_image(index, rng, 64), "PNG"))
    (folder / "corrupt.jpg").write_bytes(encode(synthetic_image(0, rng, 64))[:200])
    (folder / "notes.jpg").write_text("not an image")
    code = predict([str(folder), "--format", "json", "--model", str(project / "models/model.keras")])
    result = capsys.readouterr()
    assert code == 1, result.err
    by_name = {Path(p["path"]).name: p for p in json.loads(result.out)}
    assert set(by_name) == {"cats.png", "dogs.png", "corrupt.jpg", "notes.jpg"}
    assert by_name["cats.png"]["label"] in ("cats", "dogs") and by_name["cats.png"]["error"] is None
    assert 0.5 <= by_name["dogs.png"]["probability"] <= 1.0
    assert by_name["corrupt.jpg"]["error"].startswith("truncated")
    assert by_name["notes.jpg"]["error"].startswith("not an image")
    assert "error: " + str(folder / "notes.jpg") in result.err
    # The text and csv formats, and exit code 0, are tested in process by test_predict.py.


def test_predict_without_a_model_exits_2(project: Path, tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "stages.predict", "x.jpg", "--model", str(tmp_path / "none.keras")], project, check=False
    )
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")


def outputs_by_path(project: Path) -> dict[str, bytes]:
    """Every result a mistake could cost: models, features, metrics, reports (pictures, predictions)."""
    roots = ["models", "data/features", "metrics", "reports"]
    return {
        str(p.relative_to(project)): p.read_bytes()
        for root in roots
        for p in (project / root).rglob("*")
        if p.is_file()
    }


def set_params(project: Path, change: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(params | change, sort_keys=False))


@pytest.mark.parametrize(
    "set_option, edit, message",
    [
        (["-S", "model=nonexistent"], {}, "model: 'nonexistent' is not a backbone"),
        (["-S", "train.epochs=-5"], {}, "train.epochs: must be between 1 and 10000, got -5"),
        (["-S", "audit.backbone=vit"], {}, "audit.backbone: 'vit' is not a backbone; use one whose features"),
    ],
)
def test_a_parameter_mistake_costs_no_result(project: Path, set_option: list[str], edit: dict, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results before the mistake", "--allow-empty"], project)
    before = outputs_by_path(project)
    set_params(project, edit)
    result = dvc(project, "exp", "run", *set_option, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "git checkout params.yaml" in result.stderr
    assert stages_run(result.stdout) == {"validate"}
    assert outputs_by_path(project) == before
    run(["git", "checkout", "params.yaml"], project)  # what the error says to do
    assert json.loads(dvc(project, "status", "--json").stdout) == {"fetch": ["always changed"]}


def test_a_failing_stage_says_how_to_restore_what_dvc_removed(project: Path) -> None:
    features = project / "data/features/resnet50/features.npz"
    before = features.read_bytes()
    (project / "broken.weights.h5").write_bytes(b"not a weights file")
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["backbones"]["resnet50"]["weights"] = "broken.weights.h5"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(project, "repro", "features@resnet50", check=False)
    finally:
        params_file.write_text(original)
        (project / "broken.weights.h5").unlink()
    assert result.returncode != 0 and not features.exists()  # DVC removed the output before the stage ran
    assert "error: cannot build ResNet50" in result.stderr
    assert "`dvc checkout features@resnet50` restores" in result.stderr
    dvc(project, "checkout", "features@resnet50")
    assert features.read_bytes() == before
    dvc(project, "repro", "validate")  # it passed the damaged file's name; back to the parameters in use
    assert json.loads(dvc(project, "status", "--json").stdout) == {"fetch": ["always changed"]}
