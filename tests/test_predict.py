"""tl-predict (stages.predict) with a tiny 3-class Keras model: errors, output formats, any working folder."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stages import predict
from tests.synthetic import encode, synthetic_image
from tlpipe import prediction

CLASSES = ["apples", "kiwis", "plums"]


def save_tiny_model(folder: Path, classes: list[str]) -> Path:
    """Raw RGB of any size -> Resizing(8, 8) -> average -> softmax: the shipped model's interface, in a second."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(8, 8)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax")(x)
    path = folder / "models" / "model.keras"
    path.parent.mkdir(parents=True)
    keras.Model(inputs, outputs).save(path)
    (path.parent / "labels.json").write_text(json.dumps({"classes": classes}))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("shipped"), CLASSES)


def write_image(path: Path, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(synthetic_image(index, np.random.default_rng(index), 24), "PNG"))
    return path


def copy_model(model_path: Path, folder: Path, labels: bool = True) -> Path:
    target = folder / "models" / "model.keras"
    target.parent.mkdir(parents=True)
    shutil.copy2(model_path, target)
    if labels:
        shutil.copy2(model_path.parent / "labels.json", target.parent / "labels.json")
    return target


def test_missing_model_is_named_before_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    image = write_image(tmp_path / "a.png")
    assert predict.main([str(image), "--model", "models/model.keras"]) == 2
    err = capsys.readouterr().err
    assert err == "error: models/model.keras not found; run dvc repro (or pass --model)\n"


def test_default_model_is_the_current_folders_else_the_projects(tmp_path: Path) -> None:
    (tmp_path / "here/models").mkdir(parents=True)
    (tmp_path / "here/models/model.keras").write_bytes(b"")
    assert prediction.default_model(tmp_path / "here", tmp_path / "project") == Path("models/model.keras")
    assert prediction.default_model(tmp_path, tmp_path / "project") == tmp_path / "project/models/model.keras"
    assert prediction.default_model(tmp_path) == Path(prediction.__file__).resolve().parents[1] / "models/model.keras"


def damaged_archive(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda path: path.write_bytes(os.urandom(2000)),
            "not a .keras archive (damaged or incomplete); rebuild it with dvc repro",
        ),
        (lambda path: path.write_bytes(path.read_bytes()[:1000]), "not a .keras archive"),
        (damaged_archive, "There is no item named 'config.json' in the archive"),
    ],
    ids=["garbage", "truncated", "zip-without-config"],
)
def test_corrupt_model_cannot_be_loaded(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, damage, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    damage(copy_model(model_path, tmp_path))
    image = write_image(tmp_path / "a.png")
    assert predict.main([str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load models/model.keras: {reason}") and err.count("\n") == 1, err
    assert "File not found" not in err


def test_missing_labels_are_named(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    copy_model(model_path, tmp_path, labels=False)
    assert predict.main([str(write_image(tmp_path / "a.png"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models/labels.json not found") and "model.keras" in err and err.count("\n") == 1


def test_labels_that_do_not_match_the_model(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    copy_model(model_path, tmp_path, labels=False)
    Path("models/labels.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
    assert predict.main([str(write_image(tmp_path / "a.png"))]) == 2
    assert "it has 3 outputs but labels.json names 4 classes" in capsys.readouterr().err


def test_awkward_file_names_keep_one_line_per_image(model_path: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "incoming"
    names = ["plain.png", "two\nlines.png", "car\rriage.png", "tab\there.png", "back\\slash.png"]
    for index, name in enumerate(names):
        write_image(folder / name, index)
    (folder / "not\nan image.jpg").write_text("text")
    assert predict.main([str(folder), "--model", str(model_path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(out.split("\n")) == len(names) + 1 and out.endswith("\n")  # splitlines alone would hide a \r
    shown = sorted(line.split("\t")[0].removeprefix(f"{folder}/") for line in lines)
    assert shown == sorted(["plain.png", "two\\nlines.png", "car\\rriage.png", "tab\\there.png", "back\\\\slash.png"])
    assert all(len(line.split("\t")) == 3 and line.split("\t")[1] in CLASSES for line in lines)
    assert err.split("\n")[0] == f"error: {folder}/not\\nan image.jpg: not an image", err


def test_name_that_is_not_utf8(model_path: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "incoming"
    write_image(folder / "x.png")
    (folder / "x.png").rename(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    assert predict.main([str(folder), "--model", str(model_path)]) == 0
    assert capsys.readouterr().out.split("\t")[0] == f"{folder}/caf\\xe9.png"


def test_csv_quotes_what_would_break_a_row(model_path: Path, tmp_path: Path, capsys) -> None:
    image = write_image(tmp_path / 'a, "b"\nc\r.png')
    assert predict.main([str(image), "--model", str(model_path), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out, newline="")))
    assert rows[0] == ["path", "label", "probability", "error"]
    assert len(rows) == 2 and rows[1][0] == str(image) and rows[1][1] in CLASSES and rows[1][3] == ""


def test_runs_from_a_folder_without_models(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    elsewhere = tmp_path / "elsewhere"
    image = write_image(elsewhere / "photo.png")
    monkeypatch.chdir(elsewhere)
    assert predict.main(["photo.png", "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    path, label, probability = out.rstrip("\n").split("\t")
    assert path == "photo.png" and label in CLASSES and 1 / 3 <= float(probability) <= 1
    assert err.startswith("1 classified, 0 failed")
    assert image.is_file()


def test_json_probabilities_sum_to_one(model_path: Path, tmp_path: Path, capsys) -> None:
    images = [write_image(tmp_path / f"{index}.png", index) for index in range(4)]
    assert predict.main([*map(str, images), "--model", str(model_path), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in records] == list(map(str, images))
    for record in records:
        assert len(record["probabilities"]) == 3 and abs(sum(record["probabilities"]) - 1) < 1e-6
        assert record["probability"] == max(record["probabilities"])
        assert record["label"] == CLASSES[int(np.argmax(record["probabilities"]))] and record["error"] is None


def test_predictions_keep_the_models_precision(model_path: Path, tmp_path: Path) -> None:
    """What evaluate_model scores is the model's own output, not a rounded copy of it."""
    classifier = prediction.load_classifier(model_path)
    image = write_image(tmp_path / "a.png")
    [result] = prediction.predict_files(classifier, [image])
    expected = classifier.batch_function(1)(prediction.resized(prediction.read_pixels(image), (8, 8))[np.newaxis])[0]
    assert result.probabilities == [float(p) for p in expected]
    assert result.probability == max(result.probabilities)


def test_evaluate_model_shows_progress(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from tlpipe import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line for every image instead of every 30 s
    classifier = prediction.load_classifier(model_path)
    images = [write_image(tmp_path / f"{index}.png", index) for index in range(3)]
    predictions = prediction.predict_with_progress(classifier, images)
    assert [p.path for p in predictions] == list(map(str, images)) and all(p.error is None for p in predictions)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("evaluate_model: ") for line in lines) and "3/3" in lines[-1], lines


def test_predict_applies_the_temperature_shipped_beside_the_model(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """labels.json `temperature` (fitted on val by finetune) scales what predict prints; --uncalibrated and
    a model shipped without one print the model's own probabilities."""
    from tlpipe.statistics import apply_temperature

    shipped = copy_model(model_path, tmp_path / "calibrated")
    (shipped.parent / "labels.json").write_text(json.dumps({"classes": CLASSES, "temperature": 0.25}))
    image = write_image(tmp_path / "a.png")

    def printed(*options: str, model: Path = shipped) -> list[float]:
        assert predict.main([str(image), "--model", str(model), "--format", "json", *options]) == 0
        return json.loads(capsys.readouterr().out)[0]["probabilities"]

    raw = printed("--uncalibrated")
    assert raw == pytest.approx(printed(model=model_path), abs=1e-7)  # no temperature in its labels.json
    calibrated = printed()
    assert calibrated == pytest.approx(list(apply_temperature(np.array([raw]), 0.25)[0]), abs=1e-6)
    assert max(calibrated) > max(raw) and int(np.argmax(calibrated)) == int(np.argmax(raw))


def test_a_bad_temperature_is_one_line(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shipped = copy_model(model_path, tmp_path / "bad")
    (shipped.parent / "labels.json").write_text(json.dumps({"classes": CLASSES, "temperature": -1}))
    assert predict.main([str(write_image(tmp_path / "a.png")), "--model", str(shipped)]) == 2
    assert "labels.json: temperature must be a number above 0, got -1" in capsys.readouterr().err
