"""The ONNX Runtime engine and the `auto` choices of features.engine and features.precision: the features ONNX
Runtime computes against Keras float32's, which engine and precision `auto` picks on which hardware (a fake
/proc/cpuinfo, a GPU or none), params validation of the new values, and on the real data the same test
metrics with either engine."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import PROJECT_ROOT, SHARED_DIR, make_project, require_shared, stages_in_process
from tests.test_params import DEFAULTS, problems_with
from tlpipe.errors import PipelineError
from tlpipe.extraction import choose_engine, has_depthwise_convolutions, load_extractor, onnx_forward
from tlpipe.params import extraction_precision, load_params, precision_setting, resolve_precision, validate

MOBILENET_WEIGHTS = SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"


def fake_cpuinfo(folder: Path, flags: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return path


@pytest.mark.parametrize(
    ("flags", "gpu", "expected", "reason"),
    [
        ("fpu avx2 avx512f avx512_bf16 fma", False, "bfloat16", "avx512_bf16"),
        ("fpu avx2 amx_tile amx_bf16 amx_int8", False, "bfloat16", "amx_bf16"),
        ("fpu avx2 avx512f fma", False, "float32", "no GPU"),
        ("fpu avx2 amx_tile amx_int8", False, "float32", "no GPU"),  # AMX without its bfloat16 part
        ("fpu avx2 fma", True, "bfloat16", "GPU"),
    ],
)
def test_auto_precision_is_bfloat16_where_the_hardware_computes_it(
    tmp_path: Path, flags: str, gpu: bool, expected: str, reason: str
) -> None:
    cpuinfo = fake_cpuinfo(tmp_path, flags)
    precision, why = resolve_precision("auto", cpuinfo, gpu)
    assert precision == expected and reason in why and why.startswith("auto")
    # A value set explicitly is kept whatever the hardware.
    assert resolve_precision("float32", cpuinfo, gpu) == ("float32", "set explicitly")
    assert resolve_precision("bfloat16", cpuinfo, gpu) == ("bfloat16", "set explicitly")


def test_auto_precision_without_a_cpuinfo_file_is_float32(tmp_path: Path) -> None:
    assert resolve_precision("auto", tmp_path / "missing", gpu=False)[0] == "float32"


def test_auto_precision_is_float32_for_the_onnx_engine(tmp_path: Path) -> None:
    cpuinfo = fake_cpuinfo(tmp_path, "avx512_bf16")
    precision, why = resolve_precision("auto", cpuinfo, gpu=False, engine="onnx")
    assert precision == "float32" and "onnx" in why


def test_a_backbone_setting_of_auto_overrides_the_features_precision(tmp_path: Path) -> None:
    params = copy.deepcopy(DEFAULTS)
    params["features"] |= {"precision": "float32", "engine": "auto"}
    params["backbones"]["vgg16"]["precision"] = "auto"
    params["backbones"]["inception"].pop("precision", None)
    assert validate(params, PROJECT_ROOT) == []
    assert precision_setting(params, "vgg16") == ("auto", "backbones.vgg16.precision")
    assert precision_setting(params, "inception") == ("float32", "features.precision")
    with_bf16, without = fake_cpuinfo(tmp_path / "bf16", "avx512_bf16"), fake_cpuinfo(tmp_path / "no", "avx2")
    assert extraction_precision(params, "vgg16", with_bf16) == "bfloat16"
    assert extraction_precision(params, "vgg16", without) == "float32"
    assert extraction_precision(params, "inception", with_bf16) == "float32"


@pytest.mark.parametrize(
    ("setting", "precision", "depthwise", "gpu", "expected"),
    [
        ("auto", "float32", True, False, "onnx"),
        ("auto", "float32", False, False, "local"),  # ONNX Runtime measured no faster without depthwise convolutions
        ("auto", "bfloat16", True, False, "local"),  # ONNX Runtime runs float32 only
        ("auto", "float32", True, True, "local"),  # the GPU runs Keras
        ("local", "float32", True, False, "local"),
        ("onnx", "float32", False, False, "onnx"),
        ("ray", "bfloat16", True, True, "ray"),
    ],
)
def test_the_engine_auto_picks(setting: str, precision: str, depthwise: bool, gpu: bool, expected: str) -> None:
    engine, why = choose_engine(setting, precision, depthwise, gpu)
    assert engine == expected
    assert why.startswith("auto") == (setting == "auto") and "\n" not in why


def test_depthwise_convolutions_are_found_inside_the_base() -> None:
    mobilenet, _ = load_extractor("m", {"arch": "MobileNetV2", "image_size": 32, "weights": None})
    resnet, _ = load_extractor("r", {"arch": "ResNet50", "image_size": 32, "weights": None})
    assert has_depthwise_convolutions(mobilenet) and not has_depthwise_convolutions(resnet)


@pytest.mark.parametrize("engine", ["auto", "local", "onnx", "ray"])
def test_every_engine_is_valid(engine: str) -> None:
    assert problems_with(features__engine=engine) == []


@pytest.mark.parametrize("precision", ["auto", "float32", "bfloat16"])
def test_every_precision_setting_is_valid(precision: str) -> None:
    assert problems_with(features__precision=precision) == []
    assert problems_with(backbones__vgg16__precision=precision) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"features__engine": "openvino"}, "features.engine: must be one of auto, local, onnx, ray"),
        ({"features__precision": "float16"}, "features.precision: must be one of auto, float32, bfloat16"),
        ({"backbones__vgg16__precision": "fp32"}, "backbones.vgg16.precision: must be one of auto, float32, bfloat16"),
    ],
)
def test_unknown_engines_and_precisions_are_one_line(change: dict[str, str], named: str) -> None:
    problems = problems_with(**change)
    assert len(problems) == 1 and problems[0].startswith(named), problems


def test_the_onnx_engine_refuses_bfloat16_set_explicitly(tmp_path: Path) -> None:
    params = copy.deepcopy(DEFAULTS)
    params["features"] |= {"engine": "onnx", "precision": "bfloat16"}
    params["backbones"]["vgg16"]["precision"] = "bfloat16"
    problems = validate(params, PROJECT_ROOT)
    # Once for features.precision, however many backbones inherit it, and once for vgg16's own.
    assert len(problems) == 2, problems
    assert problems[0].startswith("backbones.vgg16.precision: bfloat16, but features.engine onnx runs float32")
    assert problems[1].startswith("features.precision: bfloat16, but features.engine onnx runs float32")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="runs float32 only"):
        load_params(tmp_path / "params.yaml")


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    scale = float(np.abs(expected).max())
    assert scale > 0
    return float(np.abs(got - expected).max() / scale)


@pytest.mark.parametrize(
    ("arch", "size", "weights"),
    [
        ("MobileNetV2", 224, MOBILENET_WEIGHTS),
        ("EfficientNetB0", 64, None),
        pytest.param("ResNet50", 32, None, marks=pytest.mark.slow),  # converting it costs half a minute
    ],
)
def test_onnx_runtime_features_equal_keras_float32_features(arch: str, size: int, weights: Path | None) -> None:
    if weights is not None:
        require_shared(weights)
    spec = {"arch": arch, "image_size": size, "weights": None if weights is None else str(weights)}
    extractor, _ = load_extractor("b", spec, seed=5)
    forward = onnx_forward(extractor, size)
    pixels = np.random.default_rng(0).uniform(0, 255, (6, size, size, 3)).astype(np.float32)
    expected = np.asarray(extractor(pixels, training=False))
    # 6 images: one full run of ONNX_IMAGES_PER_RUN and a short one, in order.
    got = forward(pixels)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert relative_difference(got, expected) < 1e-3
    assert relative_difference(forward(pixels[:1]), expected[:1]) < 1e-3
    # The images differ from one another far beyond the tolerance, so a reordered batch would show.
    assert relative_difference(expected[1:], expected[:-1]) > 1e-2


def engine_run(project: Path, engine: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, features' meta) of the stages `dvc repro evaluate@mobilenet` reruns after features, with
    `engine`."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["engine"] = engine
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = [("features", "mobilenet"), ("train", "mobilenet"), ("crossval", "mobilenet"), ("audit",)]
    stages_in_process(project, *stages, ("evaluate", "mobilenet"))
    metrics = json.loads((project / "metrics" / "mobilenet.json").read_text())
    meta = json.loads((project / "data" / "features" / "mobilenet" / "meta.json").read_text())
    shutil.rmtree(project / "data" / "features" / "mobilenet")
    return metrics, meta


@pytest.mark.slow
@pytest.mark.real_data
def test_both_engines_give_the_same_test_metrics_on_the_real_data(tmp_path: Path) -> None:
    require_shared(ZIP, MOBILENET_WEIGHTS)
    backbone = {"arch": "MobileNetV2", "image_size": 224, "weights": str(MOBILENET_WEIGHTS), "precision": "float32"}
    project = make_project(
        tmp_path / "project",
        {"data": {"url": ZIP.as_uri()}, "backbones": {"mobilenet": backbone}, "model": "mobilenet"},
    )
    stages_in_process(project, ("validate",), ("fetch",), ("prepare",))
    keras_metrics, keras_meta = engine_run(project, "local")
    onnx_metrics, onnx_meta = engine_run(project, "onnx")
    assert (keras_meta["engine"], onnx_meta["engine"]) == ("local", "onnx")
    assert keras_meta["precision"] == onnx_meta["precision"] == "float32"
    assert onnx_metrics["n_test"] == 1000
    # Every measured number but the wall-clock ones (throughput, the shipped base's latency).
    timing = {k for k in keras_metrics if k == "images_per_second" or k.startswith("latency_")}
    numbers = [k for k, v in keras_metrics.items() if isinstance(v, float) and k not in timing]
    assert {"accuracy", "f1", "roc_auc", "loss"} <= set(numbers)
    assert {k: round(onnx_metrics[k], 3) for k in numbers} == {k: round(keras_metrics[k], 3) for k in numbers}
