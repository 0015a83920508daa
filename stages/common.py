"""Helpers every stage shares: user-facing errors, atomic writes, seeding, paths."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# Written by the `validate` stage, which every other stage runs after (see stages/validate.py).
VALIDATED = Path("data/params.validated")
RAW_DIR = Path("data/raw")
RAW_ARCHIVE = RAW_DIR / "dataset.zip"
PREPARED_DIR = Path("data/prepared")
MANIFEST = PREPARED_DIR / "manifest.csv"
CLASSES = PREPARED_DIR / "classes.json"
REPORT = PREPARED_DIR / "report.json"
FEATURES_DIR = Path("data/features")
MODELS_DIR = Path("models")
# What finetune trains, and what the `ship` stage then puts in place of the shipped model. Two paths, so
# that the shipped model stays in place (DVC deletes a stage's outputs before it runs the stage) while a
# new one trains. Files, not folders: no backbone key (models/<key>/) can take these names.
FINETUNED_MODEL = MODELS_DIR / "finetuned.keras"
FINETUNED_LABELS = MODELS_DIR / "finetuned.labels.json"
# The shipped model and its class names: what predict, evaluate_model and users load.
SHIPPED_MODEL = MODELS_DIR / "model.keras"
SHIPPED_LABELS = MODELS_DIR / "labels.json"
METRICS_DIR = Path("metrics")
EVALUATION_DIR = Path("reports/evaluation")
TRAINING_PICTURES_DIR = Path("reports/training")


class PipelineError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: for one-line errors."""
    # KeyError's str() wraps its message in quotes.
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def removes_outputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    """Whether DVC deleted outputs of `stage` before running it: it does for every output but `persist` ones."""
    import yaml

    try:
        spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][stage.split("@")[0]]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return True  # cannot tell: better a hint too many than a lost result
    spec = spec.get("do", spec)
    entries = [entry for kind in ("outs", "metrics", "plots") for entry in spec.get(kind) or []]
    return any(not (isinstance(entry, dict) and next(iter(entry.values()), {}).get("persist")) for entry in entries)


def recovery_hint(stage: str | None) -> str:
    """How to get back what DVC removed before running `stage` (it deletes a stage's outputs first)."""
    if not stage or not removes_outputs(stage):
        return ""
    return (
        f" [dvc removed the previous outputs of {stage} before running it: `dvc checkout {stage}` restores "
        "the cached ones; metrics and pictures you committed come back with `git checkout -- <path>`]"
    )


def stage_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage's main(), turning a PipelineError into one line on stderr and exit code 1.

    Under `dvc repro` (which sets DVC_STAGE) the line also says how to restore the stage's previous outputs.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}{recovery_hint(os.environ.get('DVC_STAGE'))}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("error: interrupted; nothing was half-written, rerun the stage", file=sys.stderr)
            sys.exit(130)

    return wrapper


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    A killed or failing stage therefore never leaves a half-written output behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the full suffix (".keras", ".weights.h5"): Keras picks the file format from it.
    stem, dot, suffix = target.name.partition(".")
    # A run killed with SIGKILL cannot clean up after itself; the next write of the same file does.
    for stale in target.parent.glob(f".{stem}.tmp-*{dot}{suffix}"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=dot + suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp creates 0600; outputs are ordinary files others may read
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; it replaces `target` only if the block succeeds.

    Folders that a killed earlier run left beside `target` are removed first, and the swap is two
    renames, so at no moment does `target` hold a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the output should read like any other folder
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); delete it and rerun dvc repro") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TF ops deterministic, so reruns give equal metrics."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
