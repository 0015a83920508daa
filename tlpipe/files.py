"""Writing outputs so that a killed or failing stage never leaves a half-written file; reading JSON; file sizes
and digests; which names in a dataset are hidden files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.errors import PipelineError


def is_hidden(name: str) -> bool:
    """A dotfile: a dot, then a name (.DS_Store, ._x.jpg, .git). A name of dots only (`...`; `.` and `..`
    never get here) is an odd name, not a hidden one, so a class folder called that stays a class instead of
    vanishing unreported. The one rule for a packed local folder (fetch) and an unpacked archive (prepare)."""
    return name.startswith(".") and name.strip(".") != ""


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


def megabytes(n_bytes: float) -> str:
    """A file size as every report writes it: decimal megabytes, one decimal."""
    return f"{n_bytes / 1e6:.1f} MB"


def gigabytes(n_bytes: float) -> str:
    """A memory size: decimal gigabytes, two decimals."""
    return f"{n_bytes / 1e9:.2f} GB"


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); delete it and rerun dvc repro") from None


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
