"""Shared fixtures and test order for `pytest -n auto --dist loadfile`.

xdist hands whole modules to workers in collection order, so a long module collected last (the end-to-end
pipeline and the real-data study sort late by name) would run alone at the end while the other worker idles:
the longest modules start first. The gate pipeline's run is built once per session and shared by the two
modules that check it, whichever workers they run on.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from tests.ci_gate import gate_project
from tests.helpers import dvc, local_s3_server
from tlpipe.params import TRACE_VARIABLE

# Each runs one or more whole pipelines: the slowest first. test_pipeline_changes.py reuses the gate run that
# test_pipeline_e2e.py builds, so it starts second on its worker, after the real-data study; so does
# test_shared_cache.py, after it.
LONGEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_real_data.py",
    "test_pipeline_changes.py",
    "test_shared_cache.py",
    "test_interrupted.py",
    "test_multiclass_e2e.py",
    "test_many_classes.py",
    "test_distribute.py",
    "test_export.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a module


@pytest.fixture(scope="session")
def gate_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline reproduced on CI's gate configuration (tests/gate/params.yaml), with its committed
    metrics at HEAD: built once per session. The first xdist worker to ask builds it under a lock while any
    other waits. Modules copy it before they change anything. Beside it, `params-read/` holds the
    parameters each stage read (tlpipe.params.TRACE_VARIABLE)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the parent is common to workers
    root = shared / "gate-run"
    with FileLock(f"{root}.lock"):
        if not (root / "reproduced").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            project = gate_project(root)
            dvc(project, "repro", env={TRACE_VARIABLE: str(root / "params-read")})
            (root / "reproduced").write_text("")
    return root / "project"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of an S3 API on 127.0.0.1 (moto's server, in memory), one per xdist worker, stopped at
    the end of the session; each test makes its own bucket (tests.helpers.create_bucket)."""
    with local_s3_server() as endpoint:
        yield endpoint
