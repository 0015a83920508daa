"""Batched predict (tlpipe.prediction.predict_files, tl-predict --batch-size): equal to one image at a time for
the .keras model and its LiteRT and ONNX exports, unreadable files inside a batch, decoding bounded ahead of
the model, and json written record by record as json.dump would write it."""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from stages import predict
from tests.synthetic import encode, synthetic_image
from tlpipe import export, prediction
from tlpipe.output_formats import json_record, write_predictions

CLASSES = ["apples", "kiwis", "plums"]


def flat_model(height: int, width: int) -> object:
    """Raw RGB of any size -> Resizing -> every pixel into a Dense softmax: a resize that differs by a little
    from the model's own shows in the probabilities (an average would hide it)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(height, width, name="resize")(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def photos(folder: Path, n: int) -> list[Path]:
    """n images of different sizes and aspect ratios, JPEG and PNG in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        image = synthetic_image(index, rng, 32).resize((17 + 9 * index % 40, 13 + 7 * index % 29))
        fmt = "JPEG" if index % 2 else "PNG"
        paths.append(folder / f"{index:02d}.{fmt.lower()}")
        paths[-1].write_bytes(encode(image, fmt))
    return paths


def probabilities(predictions: list[prediction.Prediction]) -> np.ndarray:
    assert all(p.error is None for p in predictions), [p.error for p in predictions]
    return np.array([p.probabilities for p in predictions])


def test_batches_equal_one_image_at_a_time(tmp_path: Path) -> None:
    """Images resized beforehand (as the model's Resizing would) and stacked give what the model gives each
    image at its own size; the last batch is short; the resize is not square, so swapped axes would show."""
    model = flat_model(12, 10)
    classifier = prediction.keras_classifier(model, CLASSES)
    assert classifier.image_size == (12, 10)
    files = photos(tmp_path, 11)
    batched = list(prediction.predict_files(classifier, files, batch_size=4))
    singly = list(prediction.predict_files(classifier, files, batch_size=1))
    assert [p.path for p in batched] == [p.path for p in singly] == list(map(str, files))
    assert [p.label for p in batched] == [p.label for p in singly]
    assert np.abs(probabilities(batched) - probabilities(singly)).max() <= 1e-5
    # Batch 1 is the model called on each image as it is, nothing resized before it.
    own = np.array([model(prediction.read_pixels(path)[np.newaxis]).numpy()[0] for path in files])
    assert np.abs(probabilities(singly) - own).max() <= 1e-6


def test_a_model_that_does_not_resize_first_runs_one_image_at_a_time(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    classifier = prediction.keras_classifier(keras.Model(inputs, keras.layers.Dense(3, "softmax")(x)), CLASSES)
    assert classifier.image_size is None
    files = photos(tmp_path, 3)
    assert len(probabilities(list(prediction.predict_files(classifier, files, batch_size=8)))) == 3


def write_bad_files(folder: Path) -> tuple[Path, Path]:
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    return folder / "notes.png", folder / "empty.jpg"


def test_unreadable_files_inside_a_batch_get_their_own_error(tmp_path: Path) -> None:
    """One batch mixes good and bad files, one holds bad files only; the good ones are classified as alone."""
    classifier = prediction.keras_classifier(flat_model(8, 8), CLASSES)
    good = photos(tmp_path, 4)
    notes, empty = write_bad_files(tmp_path)
    files = [good[0], notes, empty, good[1], good[2], tmp_path / "gone.png", good[3]]
    results = list(prediction.predict_files(classifier, files, batch_size=2))
    assert [p.path for p in results] == list(map(str, files))
    errors = {Path(p.path).name: p.error for p in results if p.error}
    assert errors == {"notes.png": "not an image", "empty.jpg": "empty file (0 bytes)", "gone.png": errors["gone.png"]}
    assert errors["gone.png"].startswith("cannot read")
    alone = probabilities(list(prediction.predict_files(classifier, good, batch_size=1)))
    assert np.abs(probabilities([p for p in results if not p.error]) - alone).max() <= 1e-5


def test_decoding_stays_a_bounded_number_of_images_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many files, only the chunks decoded ahead are held: the first prediction comes before the
    rest are read, and halfway through, half the files have not been submitted for decoding yet."""
    submitted: list[int] = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            submitted.append(1)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(prediction, "ThreadPoolExecutor", CountingPool)
    classifier = prediction.keras_classifier(flat_model(8, 8), CLASSES)
    files = photos(tmp_path, 2) * 200
    batch = 4
    held = (max(2, -(-prediction.DECODE_AHEAD // batch)) + 1) * batch
    results = prediction.predict_files(classifier, files, batch_size=batch)
    next(results)
    assert len(submitted) <= held
    for _ in range(199):
        next(results)
    assert len(submitted) <= 200 + held < len(files)
    assert len(list(results)) == len(files) - 200 and len(submitted) == len(files)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model shipped with its labels.json (image_size as finetune writes it), and its LiteRT and ONNX exports."""
    folder = tmp_path_factory.mktemp("exported")
    model = flat_model(10, 10)
    (folder / "models").mkdir()
    model.save(folder / "models" / "model.keras")
    labels = json.dumps({"classes": CLASSES, "image_size": 10})
    (folder / "models" / "labels.json").write_text(labels)
    (folder / "exports").mkdir()
    assert export.export_formats(model, ["tflite", "onnx"], folder / "exports") == {}
    (folder / "exports" / "labels.json").write_text(labels)
    return folder


@pytest.mark.parametrize(("name", "runtime"), [("model.tflite", "LiteRT"), ("model.onnx", "ONNX Runtime")])
def test_an_export_predicts_in_batches_like_the_keras_model(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, runtime: str
) -> None:
    classifier = prediction.load_classifier(exported / "exports" / name)
    assert (classifier.runtime, classifier.image_size, classifier.labels) == (runtime, (10, 10), CLASSES)
    files = photos(tmp_path / "images", 9)
    batched = probabilities(list(prediction.predict_files(classifier, files, batch_size=4)))
    singly = probabilities(list(prediction.predict_files(classifier, files, batch_size=1)))
    assert np.abs(batched - singly).max() <= 1e-5
    keras_model = prediction.load_classifier(exported / "models" / "model.keras")
    assert np.abs(batched - probabilities(list(prediction.predict_files(keras_model, files)))).max() <= 1e-5

    assert (
        predict.main([str(tmp_path / "images"), "--model", str(exported / "exports" / name), "--format", "json"]) == 0
    )
    records = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in records] == list(map(str, files))
    assert np.abs(np.array([r["probabilities"] for r in records]) - batched).max() <= 1e-7


def test_a_damaged_export_is_one_line(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes((exported / "exports" / "model.tflite").read_bytes()[:5000])
    shutil.copyfile(exported / "exports" / "labels.json", tmp_path / "labels.json")
    assert predict.main([str(photos(tmp_path / "images", 1)[0]), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load {model} in LiteRT: ") and err.count("\n") == 1, err


def test_an_export_with_other_labels_is_refused(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model.onnx"
    shutil.copyfile(exported / "exports" / "model.onnx", model)
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
    assert predict.main([str(photos(tmp_path / "images", 1)[0]), "--model", str(model)]) == 2
    assert "it has 3 outputs but labels.json names 4 classes" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_batch_size_must_be_a_whole_number_above_0(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_code:
        predict.main(["photo.jpg", "--batch-size", value])
    assert exit_code.value.code == 2
    assert f"--batch-size: must be a whole number above 0, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("count", [0, 1, 3])
def test_json_written_record_by_record_is_what_json_dump_writes(count: int, capsys: pytest.CaptureFixture) -> None:
    odd = os.fsdecode(b"caf\xe9.png")
    predictions = [
        prediction.Prediction("a.png", "kiwis", 0.5, [0.25, 0.5, 0.25]),
        prediction.Prediction(odd, error="not an image"),
        prediction.Prediction('b "c"\n.png', "plums", 0.9, [0.05, 0.05, 0.9]),
    ][:count]
    out = io.StringIO()
    assert write_predictions(predictions, "json", out) == (sum(not p.error for p in predictions), count > 1)
    assert out.getvalue() == json.dumps([json_record(p) for p in predictions], indent=2) + "\n"
    capsys.readouterr()
