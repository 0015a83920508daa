"""Exports of the shipped model: each format converts, runs in its own runtime and agrees with the .keras model;
a format that fails is reported in one line while the others are still written; the export stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import PROJECT_ROOT, stages_in_process
from tests.synthetic import synthetic_image
from tlpipe import export
from tlpipe.files import sha256_file
from tlpipe.params import EXPORT_FORMATS, validate

AUGMENT = {"flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}
SIZES = [(40, 40), (31, 57), (64, 48)]  # the exports take raw RGB of any size, as the .keras model does


def tiny_shipped_model(n_classes: int, extra: Any = None) -> Any:
    """A model shaped like tlpipe.finetuning.ship_model's (resize, augmentation, preprocessing, base, and the
    pipeline's own head: adapted normalization, dropout, dense) around a two-layer base, so that converting
    it takes seconds; `extra` is one more layer after the base."""
    import keras

    from tlpipe.datasets import augmentation_layers
    from tlpipe.models import build_head

    keras.utils.set_random_seed(0)
    head = build_head(np.random.default_rng(0).normal(2.0, 3.0, (16, 8)).astype(np.float32), n_classes, 0.2, 4)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(24, 24, name="resize")(inputs)
    x = augmentation_layers(AUGMENT, 0)(x)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if extra is not None:
        x = extra(x)
    return keras.Model(inputs, head(x), name="tiny_classifier")


def images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, (h, w, 3)).astype(np.float32) for h, w in SIZES]


def keras_probabilities(model: Any, pixels: list[np.ndarray]) -> np.ndarray:
    from tlpipe.scoring import class_probabilities

    return np.array([class_probabilities(model(image[np.newaxis], training=False).numpy())[0] for image in pixels])


def test_every_format_name_has_a_description() -> None:
    assert list(export.FORMATS) == list(EXPORT_FORMATS)


@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        (["saved_model", "tflite"], []),
        (["tflite", "keras"], ["export.formats: unknown format 'keras'; allowed:"]),
        ([], ["export.formats: must be a list of one or more of"]),
        ("onnx", ["export.formats: must be a list of one or more of"]),
        (["onnx", "onnx"], ["export.formats: names a format twice"]),
    ],
)
def test_formats_are_validated(formats: Any, expected: list[str]) -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["export"]["formats"] = formats
    problems = [p for p in validate(params, PROJECT_ROOT) if p.startswith("export")]
    assert len(problems) == len(expected)
    assert all(p.startswith(e) for p, e in zip(problems, expected))


def test_parity_scores_against_an_independent_count() -> None:
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    other = np.array([[0.8, 0.2], [0.2, 0.8], [0.4, 0.6], [0.45, 0.55]])
    y_true = np.array([0, 1, 0, 0])
    scores = export.parity(reference, other, y_true)
    # Top classes: reference 0,1,0,1; other 0,1,1,1 -> agree on 3 of 4; right on images 0 and 1.
    assert scores == {"accuracy": 0.5, "agreement": 0.75, "max_probability_difference": 0.2}


@pytest.mark.parametrize(
    ("name", "scores", "keras_accuracy", "problem"),
    [
        ("tflite", {"accuracy": 0.9, "agreement": 0.999, "max_probability_difference": 1e-3}, 0.9, None),
        ("tflite", {"accuracy": 0.9, "agreement": 0.998, "max_probability_difference": 0.0}, 0.9, "agrees with"),
        ("onnx", {"accuracy": 0.9, "agreement": 1.0, "max_probability_difference": 0.0011}, 0.9, "differs from"),
        ("tflite_int8", {"accuracy": 0.89, "agreement": 0.9, "max_probability_difference": 0.5}, 0.9, None),
        ("tflite_float16", {"accuracy": 0.8899, "agreement": 1.0, "max_probability_difference": 0.0}, 0.9, "loses"),
    ],
)
def test_parity_bars(name: str, scores: dict[str, float], keras_accuracy: float, problem: str | None) -> None:
    found = export.parity_problem(name, scores, keras_accuracy)
    assert (found is None) if problem is None else found.startswith(problem)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_each_format_runs_in_its_runtime_and_agrees_with_keras(n_classes: int, tmp_path: Path) -> None:
    model = tiny_shipped_model(n_classes)
    assert export.export_formats(model, list(EXPORT_FORMATS), tmp_path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.path for f in export.FORMATS.values())
    pixels = images()
    reference = keras_probabilities(model, pixels)
    for name, spec in export.FORMATS.items():
        probabilities = np.array([export.load_runner(name, tmp_path / spec.path)(image) for image in pixels])
        assert probabilities.shape == (len(SIZES), n_classes), name
        difference = np.abs(probabilities - reference).max()
        assert difference <= (2e-2 if spec.quantized else 1e-5), (name, difference)
    # Raw RGB of any size and any batch: what the serving signature and the LiteRT input declare.
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    signature = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serve"]
    assert signature.structured_input_signature[1]["image"].shape.as_list() == [None, None, None, 3]
    details = Interpreter(model_path=str(tmp_path / "model.tflite")).get_input_details()[0]
    assert list(details["shape_signature"]) == [-1, -1, -1, 3] and details["dtype"] == np.float32


def test_a_format_that_cannot_convert_gets_one_line_and_the_others_are_written(tmp_path: Path) -> None:
    """A layer whose inference graph holds a random op: TensorFlow runs it; TFLite and ONNX have no kernel."""
    import keras
    import tensorflow as tf

    class Jitter(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x + 0.0 * tf.random.stateless_uniform(tf.shape(x), seed=(1, 2))

    model = tiny_shipped_model(2, extra=Jitter())
    failed = export.export_formats(model, ["saved_model", "tflite", "onnx"], tmp_path)
    assert set(failed) == {"tflite", "onnx"}
    for reason in failed.values():
        assert "\n" not in reason and "StatelessRandom" in reason, reason
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]
    runner = export.load_runner("saved_model", tmp_path / "saved_model")
    assert np.abs(runner(images()[0]) - keras_probabilities(model, images()[:1])[0]).max() <= 1e-6


def shipped_project(root: Path, model: Any, classes: list[str], formats: list[str]) -> Path:
    """What the export stage reads, written directly: params.yaml, the prepared test images and their
    manifest, an empty drop list, and a shipped model with its labels.json."""
    from tlpipe.models import save_model

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["export"] = {"formats": formats}
    params["model"] = "mobilenet"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rng, rows = np.random.default_rng(1), []
    for i in range(12):
        label = classes[i % len(classes)]
        path = root / "data/prepared/test" / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(i % len(classes), rng, size=30 + i).save(path)
        rows.append({"path": str(path.relative_to(root)), "label": label, "split": "test"})
    manifest = pd.DataFrame(rows)
    manifest["sha256"] = [sha256_file(root / path) for path in manifest["path"]]
    manifest.to_csv(root / "data/prepared/manifest.csv", index=False)
    (root / "data/prepared/classes.json").write_text(json.dumps(classes))
    (root / "data/audit").mkdir(parents=True)
    (root / "data/audit/dropped_test.csv").write_text("path\n")
    (root / "models").mkdir()
    save_model(model, root / "models/model.keras")
    (root / "models/labels.json").write_text(json.dumps({"classes": classes, "temperature": 1.5}))
    return root


def test_the_stage_scores_every_format_and_leaves_out_one_that_misses_its_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = ["cats", "dogs", "foxes"]
    project = shipped_project(tmp_path, tiny_shipped_model(3), classes, ["saved_model", "tflite", "onnx"])
    load_runner = export.load_runner

    def onnx_off_by_a_little(name: str, path: Path) -> export.Runner:
        run = load_runner(name, path)
        if name != "onnx":
            return run
        return lambda image: np.abs(run(image) + np.array([0.002, -0.001, -0.001]))

    monkeypatch.setattr("stages.export.load_runner", onnx_off_by_a_little)
    code, stderr = stages_in_process(project, ("export",))
    metrics = json.loads((project / "metrics/export.json").read_text())
    assert metrics["failed"] == {"onnx": "differs from .keras by up to 0.002 in a probability (at most 0.001)"}
    assert "export: onnx not exported: differs from .keras by up to 0.002" in stderr
    assert sorted(p.name for p in (project / "exports").iterdir()) == ["labels.json", "model.tflite", "saved_model"]
    assert json.loads((project / "exports/labels.json").read_text())["temperature"] == 1.5
    assert metrics["n_test"] == 12 and metrics["backbone"] == "mobilenet"
    for name in ("saved_model", "tflite"):
        assert metrics[name]["agreement"] == 1.0 and metrics[name]["max_probability_difference"] <= 1e-5
        assert metrics[name]["accuracy"] == metrics[export.KERAS]["accuracy"]
        assert metrics[name]["latency_ms_p95"] >= metrics[name]["latency_ms_p50"] > 0
    assert metrics["tflite"]["size_bytes"] == (project / "exports/model.tflite").stat().st_size
    assert metrics["onnx"]["max_probability_difference"] == 0.002 and "latency_ms_p50" not in metrics["onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["EfficientNetB0"])
def test_the_efficientnet_package_exports_to_saved_model_and_tflite(arch: str, tmp_path: Path) -> None:
    """The shipped model as finetune builds it (random weights, small images: the graph is the same), for the
    default backbone whose layers come from a third-party package (`efficientnet`); the gate pipeline exports
    InceptionV3 and ResNet50 to SavedModel, and `python -m benchmarks.export` every default backbone to every
    format (docs/performance.md)."""
    from tlpipe.backbones import build_base
    from tlpipe.finetuning import ship_model
    from tlpipe.models import build_head

    base = build_base(arch, 32, None)
    head = build_head(np.random.default_rng(0).normal(size=(8, base.output_shape[-1])).astype(np.float32), 2, 0.2, 0)
    model, _ = ship_model("b", {"arch": arch, "image_size": 32, "weights": None}, head, AUGMENT, 0)
    assert export.export_formats(model, ["saved_model", "tflite"], tmp_path) == {}
    pixels = images()
    reference = keras_probabilities(model, pixels)
    for name in ("saved_model", "tflite"):
        runner = export.load_runner(name, tmp_path / export.FORMATS[name].path)
        assert np.abs(np.array([runner(image) for image in pixels]) - reference).max() <= 1e-4, name
