"""Load `params.yaml` and validate all of it before any stage does work.

Every problem is reported on its own line that names the parameter and what is allowed.
"""

from __future__ import annotations

import atexit
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tlpipe.backbones import PRECISIONS, REGISTRY
from tlpipe.errors import PipelineError, visible

PARAMS_FILE = Path("params.yaml")
# When set to a folder, each stage writes there which parameters it read (tests/test_dependencies.py
# compares that with the stage's `params:` in dvc.yaml).
TRACE_VARIABLE = "TL_PARAMS_TRACE"
BACKBONE_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_KEYS = {
    "model",
    "summary",
    "train",
    "plots",
    "crossval",
    "audit",
    "export",
}  # names of files and folders beside metrics/<key>.json

Check = Callable[[Any], "str | None"]  # returns what is wrong, or None


def _int(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if (low is not None and value < low) or (high is not None and value > high):
            return f"must be between {low} and {high}, got {value}"
        return None

    return check


def _int_or_null(low: int, high: int | None = None) -> Check:
    check_int = _int(low, high)

    def check(value: Any) -> str | None:
        return None if value is None else check_int(value)

    return check


def _float(low: float, high: float, *, include_low: bool = True, include_high: bool = True) -> Check:
    def check(value: Any) -> str | None:
        # NaN (`.nan` in YAML) compares false with both bounds, so it must be refused before them.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"must be a number, got {value!r}"
        too_low = value < low if include_low else value <= low
        too_high = value > high if include_high else value >= high
        if too_low or too_high:
            left, right = "[" if include_low else "(", "]" if include_high else ")"
            return f"must be in {left}{low}, {high}{right}, got {value}"
        return None

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _choice(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(str, allowed))}, got {value!r}"

    return check


def _layers(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return f"must be a layer count (0 or more) or the name of the first layer to train, got {value!r}"


def _regression(value: Any) -> str | None:
    """{metric or pattern: {max_drop: x, max_rise: y, ignore: bool, noise: interval}}, with a `default` rule
    for metrics not listed."""
    if not isinstance(value, dict) or "default" not in value:
        return "must map metric names to {max_drop, max_rise, ignore, noise} and include `default`"
    for metric, rule in value.items():
        if not isinstance(rule, dict) or not rule or rule.keys() - {"max_drop", "max_rise", "ignore", "noise"}:
            return f"{metric}: must be a mapping with max_drop, max_rise, ignore and/or noise, got {rule!r}"
        if "noise" in rule and rule["noise"] not in ("interval", None):
            return f"{metric}.noise: must be interval (or null), got {rule['noise']!r}"
        for key in ("max_drop", "max_rise"):
            if key in rule and not _is_tolerance(rule[key]):
                return f"{metric}.{key}: must be a number 0 or more, got {rule[key]!r}"
        if "ignore" in rule and not isinstance(rule["ignore"], bool):
            return f"{metric}.ignore: must be true or false, got {rule['ignore']!r}"
    return None


def _is_tolerance(value: Any) -> bool:
    """A number 0 or more that the gate can compute with: not NaN (which would let every change through), not
    an integer beyond any float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return float(value) >= 0  # False for NaN
    except OverflowError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name longer than the file system takes: no such file either
        return False


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `scheme://host:port`, else None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        return (parts.hostname, parts.port) if parts.hostname and parts.port else None
    except ValueError:
        return None


def _address(value: Any) -> str | None:
    if value is None or value == "auto" or (isinstance(value, str) and host_and_port(value)):
        return None
    return f"must be null (start Ray on this machine), auto, host:port or ray://host:port, got {value!r}"


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be an http(s):// or file:// URL or a local path"
    return None


def _sha256(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value)):
        return None
    return f"must be null or 64 hex digits, got {value!r}"


# features.precision: auto resolves to one of PRECISIONS on the machine that extracts (resolve_precision).
PRECISION_SETTINGS = ("auto", *PRECISIONS)
# features.engine: auto picks local or onnx per backbone (tlpipe/extraction.py choose_engine).
ENGINES = ("auto", "local", "onnx", "ray")
# The heads on cached features (tlpipe/models.py describes each).
HEADS = ("logistic", "keras")
# What the export stage can write (tlpipe/export.py FORMATS describes each); here so that validating stays light.
EXPORT_FORMATS = ("saved_model", "tflite", "tflite_int8", "tflite_float16", "onnx")


def _formats(value: Any) -> str | None:
    allowed = ", ".join(EXPORT_FORMATS)
    if not isinstance(value, list) or not value:
        return f"must be a list of one or more of {allowed}, got {value!r}"
    if unknown := [name for name in value if name not in EXPORT_FORMATS]:
        return f"unknown format {', '.join(map(repr, unknown))}; allowed: {allowed}"
    if len(set(value)) < len(value):
        return "names a format twice"
    return None


AUGMENT = {
    "flip": _bool,
    "rotation": _float(0.0, 0.5),
    "zoom": _float(0.0, 0.9),
    "translation": _float(0.0, 0.9),
    "contrast": _float(0.0, 1.0),
}
SCHEMA: dict[str, Any] = {
    "data": {
        "url": _url,
        "sha256": _sha256,
        "val_fraction": _float(0.0, 1.0, include_low=False, include_high=False),
        "test_fraction": _float(0.0, 1.0, include_low=False, include_high=False),
        "max_extract_bytes": _int(1),
        "max_download_bytes": _int(1),
        "download_deadline": _float(0.0, 7 * 24 * 3600.0, include_low=False),
        "min_download_rate": _float(0.0, 1e12),
        "max_archive_entries": _int(1),
        "max_image_pixels": _int(1),
        "min_class_images": _int_or_null(1),
    },
    "seed": _int(0, 2**31 - 1),
    "model": None,  # checked against the backbone keys
    "backbones": None,  # checked by _check_backbones
    "features": {
        "batch_size": _int(1, 1024),
        "precision": _choice(*PRECISION_SETTINGS),
        "views": _int(0, 20),
        "augment": AUGMENT,
        "engine": _choice(*ENGINES),
        "ray": {
            "address": _address,
            "workers": _int(1, 4096),
            "cpus_per_worker": _float(0.0, 1024.0, include_low=False),
            "gpus_per_worker": _float(0.0, 64.0),
        },
    },
    "train": {
        "epochs": _int(1, 10000),
        "batch_size": _int(1, 65536),
        "learning_rate": _float(0.0, 10.0, include_low=False),
        "dropout": _float(0.0, 1.0, include_high=False),
        "hidden_units": _int(0, 65536),
        "patience": _int(0, 10000),
        "class_weight": _choice(None, "balanced"),
        "head": _choice(*HEADS),
        "min_val_per_class": _int(0, 100000),
    },
    "finetune": {
        "unfreeze": _layers,
        "epochs": _int(0, 10000),
        "batch_size": _int(1, 4096),
        "learning_rate": _float(0.0, 1.0, include_low=False),
        "patience": _int(0, 10000),
        "augment": AUGMENT,
        "cached_views": _int(0, 100),
    },
    "distribute": {"strategy": _choice("none", "mirrored"), "cpu_replicas": _int(1, 64)},
    "stats": {
        "confidence": _float(0.5, 1.0, include_high=False),
        "bootstrap": _int(100, 100000),
        "alpha": _float(0.0, 0.5, include_low=False),
        "calibration_alpha": _float(0.0, 1.0, include_low=False),
    },
    "crossval": {"folds": _int(2, 100), "repeats": _int(1, 100)},
    "audit": {
        "backbone": None,  # null (model's), or checked against the backbone keys
        "near_duplicate_threshold": _float(0.0, 1.0, include_low=False),
        "leakage": _choice("report", "drop", "fail"),
    },
    "export": {"formats": _formats},
    "regression": _regression,
}
OPTIONAL_SECTIONS: set[str] = set()
# Parameters added after users had a params.yaml: where absent, they take these values (a params.yaml
# written before them means what it meant).
DEFAULTS: dict[tuple[str, ...], Any] = {
    ("data", "min_class_images"): None,
    ("data", "max_download_bytes"): 4_000_000_000,
    ("data", "download_deadline"): 3600,
    ("data", "min_download_rate"): 10_000,
    ("data", "max_archive_entries"): 1_000_000,
    ("train", "head"): "keras",
    ("train", "min_val_per_class"): 0,
    ("features", "engine"): "local",
    ("features", "ray"): {"address": None, "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
    ("finetune", "cached_views"): 0,
}
# Parameters that moved or went away: an old params.yaml gets one line per key naming the new spelling.
MOVED = {
    ("augment",): (
        "moved: extraction's extra views are features.views and features.augment, fine-tuning's augmentation "
        "is finetune.augment (same keys: flip, rotation, zoom, translation, contrast), so that tuning one no "
        "longer reruns the other"
    ),
}
RETIRED_VALUES = {
    ("distribute", "strategy", "multi_worker"): (
        "multi_worker was removed: Keras 3's Model.fit fails under MultiWorkerMirroredStrategy "
        "(keras-team/keras#20585); use none or mirrored (all GPUs of one machine)"
    ),
}


def _check_section(prefix: str, schema: Any, value: Any, problems: list[str]) -> None:
    if not isinstance(schema, dict):
        if schema is not None and (problem := schema(value)):
            problems.append(f"{prefix}: {problem}")
        return
    if not isinstance(value, dict):
        problems.append(f"{prefix}: must be a mapping with keys {', '.join(schema)}")
        return
    for key in value.keys() - schema.keys():
        name = f"{prefix}.{key}" if prefix else key
        problems.append(f"{name}: unknown parameter; allowed: {', '.join(schema)}")
    for key, sub_schema in schema.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in value:
            if not (prefix == "" and key in OPTIONAL_SECTIONS):
                problems.append(f"{name}: missing")
            continue
        _check_section(name, sub_schema, value[key], problems)


def _check_backbones(backbones: Any, root: Path, problems: list[str]) -> None:
    if not isinstance(backbones, dict) or not backbones:
        problems.append("backbones: must map at least one name to {arch, image_size, weights}")
        return
    for key, spec in backbones.items():
        name = f"backbones.{key}"
        if not isinstance(key, str) or not BACKBONE_KEY.match(key) or key in RESERVED_KEYS:
            problems.append(
                f"{name}: a backbone name must be lower case letters, digits and _ "
                f"and not one of {', '.join(sorted(RESERVED_KEYS))}"
            )
        if not isinstance(spec, dict):
            problems.append(f"{name}: must be a mapping with keys arch, image_size, weights")
            continue
        for unknown in spec.keys() - {"arch", "image_size", "weights", "precision"}:
            problems.append(f"{name}.{unknown}: unknown parameter; allowed: arch, image_size, weights, precision")
        if "precision" in spec and (problem := _choice(*PRECISION_SETTINGS)(spec["precision"])):
            problems.append(f"{name}.precision: {problem}")
        arch = spec.get("arch")
        backbone = REGISTRY.get(arch) if isinstance(arch, str) else None
        if backbone is None:
            problems.append(f"{name}.arch: unknown arch {arch!r}; allowed: {', '.join(REGISTRY)}")
        size = spec.get("image_size")
        min_size = backbone.min_image_size if backbone else 32
        if problem := _int(min_size, 1024)(size):
            problems.append(f"{name}.image_size: {problem}")
        if "weights" not in spec:
            problems.append(f"{name}.weights: missing; use imagenet, null or a path to a weights file")
            continue
        weights = spec["weights"]
        named = backbone.named_weights if backbone else ("imagenet",)
        if weights is None or weights in named:
            continue
        if not isinstance(weights, str):
            problems.append(f"{name}.weights: must be {', '.join(named)}, null or a path, got {weights!r}")
        elif not _is_file(root / weights):
            problems.append(
                f"{name}.weights: weights file {weights} not found; use {', '.join(named)}, null "
                "or the path of a Keras weights file (relative to the project root or absolute)"
            )


def validate(params: Any, root: Path = Path(".")) -> list[str]:
    """All problems with `params`, one message each; empty when it is valid."""
    if not isinstance(params, dict):
        return ["params.yaml: must be a mapping of sections (data, seed, model, backbones, ...)"]
    if moved := moved_parameters(params):
        return moved
    problems: list[str] = []
    params = with_defaults(params)
    _check_section("", SCHEMA, params, problems)
    _check_backbones(params.get("backbones"), root, problems)
    backbones = params.get("backbones")
    # Looked up among the keys as a list: a list or mapping given by mistake (`model: [vgg16]`) cannot be a
    # dict key, and asking a dict for it would raise instead of saying so.
    names = list(backbones) if isinstance(backbones, dict) else []
    if isinstance(backbones, dict) and "model" in params and params["model"] not in names:
        problems.append(f"model: {params['model']!r} is not a backbone; valid: {', '.join(map(str, backbones))}")
    problems += _onnx_precision_problems(params)
    audit = params.get("audit")
    if isinstance(backbones, dict) and isinstance(audit, dict) and audit.get("backbone") is not None:
        if audit["backbone"] not in names:
            problems.append(
                f"audit.backbone: {audit['backbone']!r} is not a backbone; use one whose features are cached: "
                f"{', '.join(map(str, backbones))}"
            )
    # A key or value may hold a line break (a quoted YAML key can): escaped, each problem stays one line.
    return [visible(problem) for problem in problems]


def _onnx_precision_problems(params: dict[str, Any]) -> list[str]:
    """`features.engine: onnx` runs float32 only: one line per backbone whose precision is set to bfloat16."""
    features, backbones = params.get("features"), params.get("backbones")
    if not isinstance(features, dict) or features.get("engine") != "onnx" or not isinstance(backbones, dict):
        return []
    problems = []
    for key, spec in backbones.items():
        if isinstance(spec, dict) and spec.get("precision", features.get("precision")) == "bfloat16":
            name = f"backbones.{key}.precision" if "precision" in spec else "features.precision"
            problems.append(
                f"{name}: bfloat16, but features.engine onnx runs float32 only; set it to float32 or auto, "
                "or features.engine to auto or local"
            )
    return list(dict.fromkeys(problems))  # features.precision once, however many backbones inherit it


def with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every absent parameter of DEFAULTS set (a copy of the sections that change)."""
    params = dict(params)
    for (*path, key), value in DEFAULTS.items():
        section = params
        for name in path:
            if not isinstance(section.get(name), dict):
                break
            section[name] = section = dict(section[name])
        else:
            section.setdefault(key, value)
    return params


def _lookup(params: Any, keys: tuple[str, ...]) -> tuple[bool, Any]:
    for key in keys:
        if not isinstance(params, dict) or key not in params:
            return False, None
        params = params[key]
    return True, params


def moved_parameters(params: dict[str, Any]) -> list[str]:
    """One line for each parameter of an older params.yaml that moved or was removed."""
    problems = [f"{'.'.join(keys)}: {why}" for keys, why in MOVED.items() if _lookup(params, keys)[0]]
    for (*keys, value), why in RETIRED_VALUES.items():
        found, current = _lookup(params, tuple(keys))
        if found and current == value:
            problems.append(f"{'.'.join(keys)}: {why}")
    return problems


class TracedParams(dict):
    """params.yaml as a dict that records the dotted name of every value read from it (for TL_PARAMS_TRACE)."""

    def __init__(self, data: dict[str, Any], reads: set[str], prefix: str = "") -> None:
        super().__init__(data)
        self.reads, self.prefix = reads, prefix

    def _wrap(self, key: str, value: Any) -> Any:
        name = f"{self.prefix}{key}"
        self.reads.add(name)
        return TracedParams(value, self.reads, f"{name}.") if isinstance(value, dict) else value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        self.reads.add(f"{self.prefix}{key}")
        return self[key] if key in self else default

    def items(self) -> Any:
        return [(key, self[key]) for key in self]

    def values(self) -> Any:
        return [self[key] for key in self]

    def __or__(self, other: Any) -> dict[str, Any]:
        return {key: self[key] for key in self} | dict(other)


def recording_reads(params: dict[str, Any], folder: str) -> dict[str, Any]:
    """`params` recording what is read; the names are written to <folder>/<stage>.json when the process ends."""
    reads: set[str] = set()
    stage = os.environ.get("DVC_STAGE", "unknown")
    out = Path(folder) / f"{stage.replace('@', '-')}.json"

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"stage": stage, "reads": sorted(reads)}, indent=1))

    atexit.register(write)
    return TracedParams(params, reads)


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Read and validate `params.yaml`; raise one PipelineError listing every problem."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    problems = validate(params, path.parent)
    if problems:
        raise PipelineError(f"{path} is invalid:\n" + "\n".join(f"  {path}: {p}" for p in problems))
    params = with_defaults(params)
    if trace := os.environ.get(TRACE_VARIABLE):
        return recording_reads(params, trace)
    return params


def audit_backbone(params: dict[str, Any]) -> str:
    """The backbone whose features the audit reads: `audit.backbone` where set, else `model`'s (so that a
    params.yaml with other backbones needs no second edit)."""
    chosen = params["audit"]["backbone"]
    return params["model"] if chosen is None else chosen


def precision_setting(params: dict[str, Any], key: str) -> tuple[str, str]:
    """(value, parameter): `backbones.<key>.precision` where set, else `features.precision`."""
    if "precision" in params["backbones"][key]:
        return params["backbones"][key]["precision"], f"backbones.{key}.precision"
    return params["features"]["precision"], "features.precision"


CPUINFO = Path("/proc/cpuinfo")
# The CPU flags of bfloat16 arithmetic, as Linux spells them in /proc/cpuinfo.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


def bfloat16_hardware(cpuinfo: Path = CPUINFO, gpu: bool | None = None) -> str | None:
    """What computes bfloat16 natively here, in words (`a GPU`, or the CPU flag that says so); None where
    bfloat16 would be emulated. `gpu` None asks TensorFlow whether it sees one."""
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        return "a GPU"
    if not _is_file(cpuinfo):
        return None
    flags = set(re.findall(r"[\w.]+", cpuinfo.read_text(errors="replace")))
    found = [flag for flag in BFLOAT16_FLAGS if flag in flags]
    return f"the CPU flag {found[0]}" if found else None


def resolve_precision(
    setting: str, cpuinfo: Path = CPUINFO, gpu: bool | None = None, engine: str = "auto"
) -> tuple[str, str]:
    """(precision, why): `auto` is bfloat16 where the hardware computes it natively (a GPU, or a CPU with
    AVX512_BF16 or AMX), float32 elsewhere, where bfloat16 is emulated and slower, and float32 for
    `features.engine: onnx`, which runs float32 only; a set value is itself."""
    if setting != "auto":
        return setting, "set explicitly"
    if engine == "onnx":
        return "float32", "auto: features.engine onnx runs float32 only"
    if hardware := bfloat16_hardware(cpuinfo, gpu):
        return "bfloat16", f"auto: {hardware} computes bfloat16 natively"
    return "float32", f"auto: no GPU, and no {' or '.join(BFLOAT16_FLAGS)} among the CPU flags"


def extraction_precision(params: dict[str, Any], key: str, cpuinfo: Path = CPUINFO) -> str:
    """The precision backbone `key` is extracted in on this machine (precision_setting, resolved)."""
    return resolve_precision(precision_setting(params, key)[0], cpuinfo, engine=params["features"]["engine"])[0]


def resolve_weights(weights: str | None, named: tuple[str, ...], root: Path = Path(".")) -> str | None:
    """The value to pass to a Keras constructor: a named set, None, or an absolute file path."""
    if weights is None or weights in named:
        return weights
    return str((root / weights).resolve())
