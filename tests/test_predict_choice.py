"""Which model tl-predict runs without --model: the shipped .keras model, or its fastest export checked against it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import predict
from tests.helpers import dvc
from tlpipe.prediction import fastest_checked_model

LATENCIES = {"keras": 9.0, "saved_model": 8.0, "tflite": 4.0, "tflite_int8": 1.0, "onnx": 3.0}
FILES = {"tflite": "model.tflite", "tflite_int8": "model_int8.tflite", "onnx": "model.onnx"}


def fake_project(root: Path, failed: dict[str, str] | None = None, lock_model: bytes = b"the shipped model") -> Path:
    """models/model.keras, exports/ with labels.json, metrics/export.json with LATENCIES, and a dvc.lock whose
    export stage recorded the md5 of `lock_model`."""
    keras_model = root / "models" / "model.keras"
    keras_model.parent.mkdir(parents=True)
    keras_model.write_bytes(b"the shipped model")
    (root / "exports").mkdir()
    (root / "exports" / "labels.json").write_text("{}")
    for name in FILES.values():
        (root / "exports" / name).write_bytes(name.encode())
    rows = {name: {"agreement": 1.0, "latency_ms_p50": ms} for name, ms in LATENCIES.items()}
    (root / "metrics").mkdir()
    (root / "metrics" / "export.json").write_text(json.dumps(rows | {"failed": failed or {}}))
    deps = [
        {"path": "models/model.keras", "md5": hashlib.md5(lock_model).hexdigest()},
        {"path": "models/labels.json", "md5": "0" * 32},
    ]
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"export": {"deps": deps}}}))
    return keras_model


def test_the_fastest_float_export_is_chosen_over_a_faster_quantized_one(tmp_path: Path) -> None:
    choice = fastest_checked_model(fake_project(tmp_path))
    assert choice.path == tmp_path / "exports" / "model.onnx"
    assert "3.0 ms per image against 9.0 ms" in choice.reason


def test_an_export_that_missed_its_parity_bar_is_passed_over(tmp_path: Path) -> None:
    choice = fastest_checked_model(fake_project(tmp_path, failed={"onnx": "agrees on 0.9 of test images"}))
    assert choice.path == tmp_path / "exports" / "model.tflite"


def test_a_missing_export_file_is_passed_over(tmp_path: Path) -> None:
    keras_model = fake_project(tmp_path)
    (tmp_path / "exports" / "model.onnx").unlink()
    assert fastest_checked_model(keras_model).path == tmp_path / "exports" / "model.tflite"


def test_exports_of_another_model_are_not_used(tmp_path: Path) -> None:
    keras_model = fake_project(tmp_path, lock_model=b"a model shipped before this one")
    choice = fastest_checked_model(keras_model)
    assert choice.path == keras_model and "dvc repro export" in choice.reason


@pytest.mark.parametrize("damage", ["no metrics", "no lock", "bad metrics", "no latency"])
def test_without_trustworthy_records_the_keras_model_runs(tmp_path: Path, damage: str) -> None:
    keras_model = fake_project(tmp_path)
    metrics = tmp_path / "metrics" / "export.json"
    if damage == "no metrics":
        metrics.unlink()
    elif damage == "no lock":
        (tmp_path / "dvc.lock").unlink()
    elif damage == "bad metrics":
        metrics.write_text("{not json")
    else:
        metrics.write_text(json.dumps({"keras": {}, "onnx": {"latency_ms_p50": 1.0}}))
    assert fastest_checked_model(keras_model).path == keras_model


def test_the_keras_model_runs_when_it_is_the_fastest(tmp_path: Path) -> None:
    keras_model = fake_project(tmp_path)
    rows = json.loads((tmp_path / "metrics" / "export.json").read_text())
    rows["keras"]["latency_ms_p50"] = 2.0
    (tmp_path / "metrics" / "export.json").write_text(json.dumps(rows))
    assert fastest_checked_model(keras_model).path == keras_model


@pytest.mark.slow  # converts the gate run's InceptionV3 to ONNX and TFLite with DVC
def test_predict_runs_the_fastest_checked_export_with_the_same_answers(
    gate_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The export stage, run by DVC, checks and times each format; predict then runs the fastest on its own,
    says so, and its probabilities are the .keras model's."""
    project = Path(shutil.copytree(gate_run, tmp_path / "project", symlinks=True))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["formats"] = ["tflite", "onnx"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(project, "repro", "export")
    results = json.loads((project / "metrics" / "export.json").read_text())
    assert results["failed"] == {}
    latency = {name: results[name]["latency_ms_p50"] for name in ("keras", "tflite", "onnx")}
    fastest = min(latency, key=latency.__getitem__)
    expected = "models/model.keras" if fastest == "keras" else f"exports/{FILES[fastest]}"

    images = [project / path for path in pd.read_csv(project / "data" / "prepared" / "manifest.csv")["path"][:6]]
    monkeypatch.chdir(project)
    assert predict.main([*map(str, images), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert f"by {expected} in " in err.splitlines()[-1]
    assert predict.main([*map(str, images), "--format", "json", "--model", "models/model.keras"]) == 0
    reference, _ = capsys.readouterr()
    chosen = np.array([row["probabilities"] for row in json.loads(out)])
    np.testing.assert_allclose(chosen, [row["probabilities"] for row in json.loads(reference)], atol=1e-3)
