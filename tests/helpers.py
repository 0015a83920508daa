"""Helpers for tests and the CI gate: throwaway git + DVC copies of the pipeline, and commands run in them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Real data and weights beside the project (never copied into it); SHARED_DIR overrides the location.
SHARED_DIR = Path(os.environ.get("SHARED_DIR", PROJECT_ROOT.parent / "shared"))
PROJECT_FILES = ("stages", "tlpipe", "dvc.yaml", "params.yaml")


def require_shared(*paths: Path) -> None:
    """Skip the calling test, saying where the real data is expected, when any of `paths` is missing."""
    import pytest

    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        pytest.skip(
            f"real data not found: {', '.join(missing)}; it is expected in {SHARED_DIR} (../shared beside the "
            "project, or set SHARED_DIR) as described in CONTRIBUTING.md"
        )


def tiny_backbones() -> dict[str, dict[str, Any]]:
    """Every default backbone, randomly initialised, at the smallest size its architecture accepts."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    return {
        key: {"arch": spec["arch"], "image_size": 75 if spec["arch"] == "InceptionV3" else 32, "weights": None}
        for key, spec in params["backbones"].items()
    }


def run(
    args: list[str], cwd: Path, check: bool = True, timeout: float = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the project's virtualenv first on PATH, as `dvc repro` runs stages; `env` adds variables."""
    env = (
        os.environ
        | {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(cwd),
            "DVC_NO_ANALYTICS": "1",
        }
        | (env or {})
    )
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def make_project(root: Path, overrides: dict[str, Any], source: Path = PROJECT_ROOT) -> Path:
    """A git + DVC repository holding a copy of the pipeline in `source` (this one's, by default), with
    params.yaml sections replaced."""
    root.mkdir(parents=True, exist_ok=True)
    for name in (*PROJECT_FILES, ".gitignore"):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(params.get(section), dict) and section != "backbones":
            params[section] = params[section] | value
        else:
            params[section] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "false"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    return root


def one_backbone_project(root: Path, data_url: str, key: str, arch: str, image_size: int, **sections: Any) -> Path:
    """make_project with a single randomly initialised backbone, shipped as `model`, plus `sections`."""
    backbone = {key: {"arch": arch, "image_size": image_size, "weights": None}}
    return make_project(root, {"data": {"url": data_url}, "backbones": backbone, "model": key, **sections})


def stages_in_process(project: Path, *calls: tuple[str, ...], check: bool = True) -> tuple[int, str]:
    """Run stage mains (("features", "vgg16"), ("audit",), ...) in this process, in `project`, in order, as
    `dvc repro` would: the stages' own code without a TensorFlow start-up per stage. (exit code, stderr);
    with `check`, a stage that exits non-zero fails the test."""
    import contextlib
    import importlib
    import io

    previous, stderr, code = Path.cwd(), io.StringIO(), 0
    os.chdir(project)
    try:
        with contextlib.redirect_stderr(stderr):
            for name, *args in calls:
                try:
                    importlib.import_module(f"stages.{name}").main(*args)
                except SystemExit as exit:
                    code = int(exit.code or 0)
                    if code:
                        break
    finally:
        os.chdir(previous)
    if check and code:
        raise AssertionError(f"stage {name} {' '.join(args)} exited {code}\n{stderr.getvalue()}")
    return code, stderr.getvalue()


def dvc(
    project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m dvc ARGS` in `project`, with the virtualenv first on PATH (see run)."""
    return run([sys.executable, "-m", "dvc", *args], project, check=check, env=env)


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro`/`dvc exp run` ran, from its standard output."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def cached_stages(output: str) -> set[str]:
    """The stages a `dvc repro`/`dvc exp run` restored from DVC's run cache instead of running them."""
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))


def report_files(project: Path) -> dict[str, bytes]:
    """Every file under reports/ (comparison, model card, evaluations, audit, pictures), by path."""
    return {
        str(path.relative_to(project)): path.read_bytes()
        for path in sorted((project / "reports").rglob("*"))
        if path.is_file()
    }


TIMING_KEYS = {"images_per_second"}  # wall-clock numbers; every other metric must repeat exactly


def metric_files(project: Path) -> dict[str, dict]:
    """Every metrics file DVC shows, the cross-validation ones included."""
    files = sorted((project / "metrics").glob("*.json")) + sorted((project / "metrics").glob("crossval/*.json"))
    return {str(p.relative_to(project)): json.loads(p.read_text()) for p in files}


def without_timing(metrics: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in values.items() if k not in TIMING_KEYS} for name, values in metrics.items()}


def training_logs(project: Path) -> dict[str, dict]:
    """The final training and validation losses of every head and of fine-tuning, at full float precision."""
    logs = sorted((project / "metrics").glob("train/*/metrics.json")) + [project / "metrics/finetune/metrics.json"]
    return {str(p.relative_to(project)): json.loads(p.read_text()) for p in logs}


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """A real Ray cluster of `nodes` nodes on 127.0.0.1, started here and stopped on the way out; yields its
    address (features.ray.address).

    Ray swaps a loopback address for the machine's own, where nothing of this cluster listens: the variable
    keeps the processes Ray starts on 127.0.0.1, the constant this one.
    """
    import pytest
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        node = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(initialize_head=True, head_node_args=node | {"include_dashboard": False})
        try:
            for _ in range(nodes - 1):
                cluster.add_node(**node)
            yield cluster.address
        finally:
            cluster.shutdown()


# moto's server accepts any key; a DVC remote still needs one to sign its requests.
S3_TEST_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """An S3 API (moto's server, in memory) on 127.0.0.1 at a free port, started here and stopped on the way
    out; yields its endpoint URL. Buckets are made with create_bucket."""
    import logging

    from moto.server import ThreadedMotoServer

    requests_log = logging.getLogger("werkzeug")  # one line per request otherwise
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        requests_log.setLevel(level)


def s3_client(endpoint: str) -> Any:
    import boto3

    keys = S3_TEST_CREDENTIALS
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys["access_key_id"],
        aws_secret_access_key=keys["secret_access_key"],
    )


def create_bucket(endpoint: str, name: str) -> str:
    """A new empty bucket on the S3 API at `endpoint`; its name."""
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object's key in `bucket`."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def add_s3_remote(project: Path, url: str, endpoint: str, name: str = "storage") -> None:
    """`url` as the default DVC remote, as docs/experiments.md sets one up: address and endpoint in .dvc/config
    (committed, shared by the team), keys in .dvc/config.local (each member's own, never committed)."""
    dvc(project, "remote", "add", "--default", name, url)
    dvc(project, "remote", "modify", name, "endpointurl", endpoint)
    set_s3_credentials(project, name)


def set_s3_credentials(project: Path, name: str = "storage") -> None:
    for option, value in S3_TEST_CREDENTIALS.items():
        dvc(project, "remote", "modify", "--local", name, option, value)
