"""params.yaml validation: every problem reported on its own line, naming the parameter."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT
from tlpipe.errors import PipelineError
from tlpipe.params import extraction_precision, load_params, resolve_weights, validate

DEFAULTS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def problems_with(**changes: object) -> list[str]:
    params = copy.deepcopy(DEFAULTS)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = params
        for part in parents:
            node = node[part]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return validate(params, PROJECT_ROOT)


def test_the_shipped_params_are_valid() -> None:
    assert validate(DEFAULTS, PROJECT_ROOT) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"backbones__vgg16__arch": "VGG17"}, "backbones.vgg16.arch: unknown arch 'VGG17'; allowed: VGG16"),
        ({"backbones__inception__image_size": 50}, "backbones.inception.image_size: must be between 75 and 1024"),
        ({"backbones__vgg16__image_size": "big"}, "backbones.vgg16.image_size: must be an integer"),
        (
            {"backbones__vgg16__weights": "missing.weights.h5"},
            "backbones.vgg16.weights: weights file missing.weights.h5 not found",
        ),
        (
            {"backbones__vgg16__weights": "noisy-student"},
            "backbones.vgg16.weights: weights file noisy-student not found",
        ),
        ({"backbones__vgg16__pooling": "max"}, "backbones.vgg16.pooling: unknown parameter"),
        ({"model": "alexnet"}, "model: 'alexnet' is not a backbone; valid: vgg16, inception"),
        ({"data__val_fraction": 1.0}, "data.val_fraction: must be in (0.0, 1.0), got 1.0"),
        ({"data__sha256": "abc"}, "data.sha256: must be null or 64 hex digits"),
        ({"data__url": KeyError}, "data.url: missing"),
        ({"train__dropout": -0.1}, "train.dropout: must be in [0.0, 1.0)"),
        ({"train__epochs": 2.5}, "train.epochs: must be an integer, got 2.5"),
        ({"train__epochs": True}, "train.epochs: must be an integer, got True"),
        ({"finetune__augment__flip": "yes"}, "finetune.augment.flip: must be true or false"),
        ({"features__augment__zoom": 2}, "features.augment.zoom: must be in [0.0, 0.9]"),
        ({"features__views": -1}, "features.views: must be between 0 and 20"),
        ({"finetune__cached_views": -1}, "finetune.cached_views: must be between 0 and 100, got -1"),
        ({"finetune__cached_views": 1.5}, "finetune.cached_views: must be an integer, got 1.5"),
        ({"distribute__strategy": "parameter_server"}, "distribute.strategy: must be one of none, mirrored"),
        (
            {"features__precision": "float16"},
            "features.precision: must be one of auto, float32, bfloat16, got 'float16'",
        ),
        ({"features__precision": KeyError}, "features.precision: missing"),
        ({"backbones__vgg16__precision": "half"}, "backbones.vgg16.precision: must be one of auto, float32, bfloat16"),
        ({"features__engine": "spark"}, "features.engine: must be one of auto, local, onnx, ray, got 'spark'"),
        ({"features__ray__workers": 0}, "features.ray.workers: must be between 1 and 4096, got 0"),
        ({"features__ray__cpus_per_worker": 0}, "features.ray.cpus_per_worker: must be in (0.0, 1024.0]"),
        ({"features__ray__gpus_per_worker": -1}, "features.ray.gpus_per_worker: must be in [0.0, 64.0]"),
        ({"features__ray__address": "head-node"}, "features.ray.address: must be null (start Ray on this machine)"),
        ({"features__ray__address": ""}, "features.ray.address: must be null"),
        ({"features__ray__nodes": 3}, "features.ray.nodes: unknown parameter; allowed: address, workers"),
        ({"seed": -1}, "seed: must be between 0"),
        ({"colour": "blue"}, "colour: unknown parameter; allowed: data, seed"),
    ],
)
def test_each_bad_value_gets_one_line_naming_it(change: dict, expected: str) -> None:
    problems = problems_with(**change)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_noisy_student_is_allowed_for_efficientnet_only() -> None:
    assert problems_with(backbones__effnet__weights="noisy-student") == []


def test_reserved_backbone_names_are_refused() -> None:
    params = copy.deepcopy(DEFAULTS)
    params["backbones"]["summary"] = params["backbones"].pop("vgg16")
    assert any(p.startswith("backbones.summary: a backbone name") for p in validate(params, PROJECT_ROOT))


def test_load_params_lists_every_problem_and_names_the_file(tmp_path: Path) -> None:
    params = copy.deepcopy(DEFAULTS)
    params["train"]["dropout"] = 2
    params["backbones"]["vgg16"]["arch"] = "VGG17"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        load_params(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path} is invalid:"
    assert len(lines) == 3 and all(str(path) in line for line in lines[1:])


def test_unparsable_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(PipelineError, match=r"params.yaml is not valid YAML") as error:
        load_params(path)
    assert "\n" not in str(error.value)


def test_weights_paths_resolve_against_the_project_root(tmp_path: Path) -> None:
    (tmp_path / "w.weights.h5").write_bytes(b"")
    assert resolve_weights("w.weights.h5", ("imagenet",), tmp_path) == str(tmp_path / "w.weights.h5")
    assert resolve_weights("imagenet", ("imagenet",), tmp_path) == "imagenet"
    assert resolve_weights(None, ("imagenet",), tmp_path) is None


def test_a_backbone_precision_overrides_the_features_precision() -> None:
    params = copy.deepcopy(DEFAULTS)
    params["features"]["precision"] = "bfloat16"
    params["backbones"]["vgg16"]["precision"] = "float32"
    params["backbones"]["inception"].pop("precision", None)
    assert validate(params, PROJECT_ROOT) == []
    assert extraction_precision(params, "vgg16") == "float32"
    assert extraction_precision(params, "inception") == "bfloat16"


def test_an_old_params_yaml_gets_one_line_per_moved_parameter() -> None:
    """The pre-move spelling: top-level `augment` (views and transforms for both stages), multi_worker."""
    params = copy.deepcopy(DEFAULTS)
    params["augment"] = {"views": 0, **params["finetune"].pop("augment")}
    del params["features"]["views"], params["features"]["augment"]
    params["distribute"]["strategy"] = "multi_worker"
    problems = validate(params, PROJECT_ROOT)
    assert len(problems) == 2, problems
    assert problems[0].startswith("augment: moved: extraction's extra views are features.views and features.augment")
    assert "finetune.augment" in problems[0]
    assert (
        problems[1].startswith("distribute.strategy: multi_worker was removed")
        and "keras-team/keras#20585" in problems[1]
    )


def test_traced_params_record_what_a_stage_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlpipe.params import TracedParams

    reads: set[str] = set()
    params = TracedParams(copy.deepcopy(DEFAULTS), reads)
    spec = params["backbones"]["vgg16"]
    assert spec["arch"] == "VGG16" and spec.get("precision") is None
    assert [key for key, _ in params["train"].items()] == list(DEFAULTS["train"])
    assert params["finetune"]["augment"] | {"flip": False} == DEFAULTS["finetune"]["augment"] | {"flip": False}
    assert {
        "backbones.vgg16.arch",
        "backbones.vgg16.precision",
        "train.epochs",
        "train.class_weight",
        "finetune.augment.zoom",
    } <= reads
    assert not any(name.startswith(("data", "features")) for name in reads)


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379"])
def test_ray_addresses_that_ray_accepts_are_valid(address: str | None) -> None:
    assert problems_with(features__ray__address=address) == []


def test_a_params_yaml_from_before_the_engine_runs_locally(tmp_path: Path) -> None:
    """features.engine and features.ray came later: a params.yaml without them keeps its meaning."""
    old = copy.deepcopy(DEFAULTS)
    del old["features"]["engine"], old["features"]["ray"]
    assert validate(old, PROJECT_ROOT) == []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(old))
    features = load_params(tmp_path / "params.yaml")["features"]
    assert features["engine"] == "local" and features["ray"]["address"] is None and features["ray"]["workers"] == 2
    assert "engine" not in old["features"]  # the caller's dict is left alone


def test_a_params_yaml_from_before_cached_fine_tuning_fine_tunes_on_the_images(tmp_path: Path) -> None:
    """finetune.cached_views came later: a params.yaml without it keeps its meaning (0, no cache)."""
    old = copy.deepcopy(DEFAULTS)
    del old["finetune"]["cached_views"]
    assert validate(old, PROJECT_ROOT) == []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(old))
    assert load_params(tmp_path / "params.yaml")["finetune"]["cached_views"] == 0
