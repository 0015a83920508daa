"""features.engine: ray on a real Ray cluster of two nodes (one worker each) on 127.0.0.1, started and stopped
here: the cache equals the local engine's, a killed worker's chunks rerun, a worker lost for good fails the
stage in one line and keeps the previous cache, and a cluster that cannot serve gets one line too."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import SHARED_DIR, local_ray_cluster, make_project, require_shared, stages_in_process
from tests.synthetic import write_dataset_zip
from tlpipe import ray_engine
from tlpipe.errors import PipelineError
from tlpipe.ray_engine import RayEngine

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

# Real ImageNet weights give features of real scale and variety, so a wrong order or resize shows; the
# workers get the file's bytes from the driver, as they would on a cluster without the project's files.
WEIGHTS = SHARED_DIR / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
KEY = "mobilenet"
FEATURES = Path("data/features") / KEY


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a two-node Ray cluster on 127.0.0.1, one CPU per node."""
    with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
        yield address


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared project of 92 images (60 + 32 augmented views) with its local engine's cache in local/."""
    require_shared(WEIGHTS)
    root = tmp_path_factory.mktemp("ray")
    data = write_dataset_zip(root / "data.zip")
    backbone = {KEY: {"arch": "MobileNetV2", "image_size": 32, "weights": str(WEIGHTS)}}
    features = {"batch_size": 4, "views": 1, "precision": "float32", "engine": "local"}
    project = make_project(
        root / "project", {"data": {"url": str(data)}, "backbones": backbone, "model": KEY, "features": features}
    )
    stages_in_process(project, ("validate",), ("fetch",), ("prepare",), ("features", KEY))
    shutil.copytree(project / FEATURES, root / "local")
    return project


def set_ray(project: Path, **ray: Any) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["engine"] = "ray"
    params["features"]["ray"] |= ray
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def load(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "features.npz") as data:
        return {name: data[name] for name in data.files}


def assert_same_features(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Equal to float16 rounding (the cache's storage), in the same order: features differ from image to
    image well beyond that tolerance, so a swapped or shifted image would show."""
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        if name.startswith("y_"):
            np.testing.assert_array_equal(got[name], array, err_msg=name)
            continue
        scale = float(np.abs(array.astype(np.float32)).max())
        assert scale > 0
        np.testing.assert_allclose(got[name].astype(np.float32), array.astype(np.float32), atol=1e-3 * scale)
        rows = array.astype(np.float32)
        assert np.abs(rows[1:] - rows[:-1]).max() > 0.05 * scale, f"{name}: images do not differ enough to test order"


def engine_job(project: Path) -> dict[str, Any]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    spec = params["backbones"][KEY] | {"weights": str(WEIGHTS)}
    return {"key": KEY, "spec": spec, "seed": params["seed"], "precision": "float32", "batch_size": 4, "n_images": 1}


def test_the_ray_engine_writes_the_local_engines_cache(project: Path, cluster: str) -> None:
    set_ray(project, address=cluster, workers=2)
    code, stderr = stages_in_process(project, ("features", KEY))
    assert code == 0, stderr
    local = project.parent / "local"
    assert_same_features(load(project / FEATURES), load(local))
    meta = yaml.safe_load((project / FEATURES / "meta.json").read_text())
    local_meta = yaml.safe_load((local / "meta.json").read_text())
    assert meta.keys() == local_meta.keys() and (meta["engine"], local_meta["engine"]) == ("ray", "local")
    timing = {"seconds", "images_per_second", "engine", "engine_setting", "latency_ms_p50", "latency_ms_p95"}
    assert {k: v for k, v in meta.items() if k not in timing} == {
        k: v for k, v in local_meta.items() if k not in timing
    }
    # train reads it as it reads the local engine's
    stages_in_process(project, ("train", KEY))


def test_a_killed_worker_is_restarted_and_its_chunks_rerun(project: Path, cluster: str) -> None:
    import ray

    paths = [str(project / path) for path in sorted((project / "data/prepared").rglob("*.jpg"))] * 3
    killed: list[int] = []

    def kill_a_worker(done: int) -> None:
        if done == 1:  # mid-run: every worker has chunks running or queued
            killed.append(engine.pids[0])
            os.kill(killed[0], 9)

    settings = {"address": cluster, "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}
    with RayEngine(settings, engine_job(project)) as engine:
        engine.on_chunk = kill_a_worker
        features = engine.files(paths, "ray")
        pids_after = [pid for pid, _ in ray.get([worker.ready.remote() for worker in engine.workers])]
    assert len(paths) // (4 * ray_engine.BATCHES_PER_CHUNK) >= 8  # enough chunks that some were lost
    assert killed and killed[0] not in pids_after and not pid_alive(killed[0])

    from tlpipe.extraction import base_forward, extract, load_extractor

    job = engine_job(project)
    extractor, _ = load_extractor(KEY, job["spec"], job["seed"])
    expected = extract(base_forward(extractor, 32, len(paths)), paths, 32, 4, "local")
    assert_same_features({"x": features}, {"x": expected})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_worker_lost_for_good_fails_in_one_line_and_keeps_the_cache(
    project: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {path.name: path.read_bytes() for path in (project / FEATURES).iterdir()}
    set_ray(project, address=cluster, workers=2)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["views"] = 2  # a different cache from the one on disk, were it written
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(ray_engine, "WORKER_RESTARTS", 0)
    enter = RayEngine.__enter__

    def entered(engine: RayEngine) -> RayEngine:
        enter(engine)
        engine.on_chunk = lambda done: os.kill(engine.pids[0], 9) if done == 1 else None
        return engine

    monkeypatch.setattr(RayEngine, "__enter__", entered)
    code, stderr = stages_in_process(project, ("features", KEY), check=False)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a Ray worker died 1 times or lost its node" in errors[0], stderr
    assert "nothing was written" in errors[0] and "Traceback" not in stderr
    assert {path.name: path.read_bytes() for path in (project / FEATURES).iterdir()} == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 3}, "features.ray asks for 3 workers x 1 CPUs = 3, but the Ray cluster has 2"),
        ({"gpus_per_worker": 1}, "features.ray asks for 2 workers x 1 GPUs = 2, but the Ray cluster has 0"),
        ({"address": "127.0.0.1:1"}, "no Ray cluster answers at 127.0.0.1:1 (features.ray.address)"),
    ],
)
def test_a_cluster_that_cannot_serve_is_one_line(
    project: Path, cluster: str, settings: dict[str, Any], message: str
) -> None:
    full = {"address": cluster, "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0} | settings
    with pytest.raises(PipelineError) as error, RayEngine(full, engine_job(project)):
        pass
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_worker_that_cannot_build_the_base_is_one_line(project: Path, cluster: str, tmp_path: Path) -> None:
    """On a Ray this engine starts itself (features.ray.address: null; on 127.0.0.1 while the cluster's
    loopback setting holds)."""
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not an HDF5 file")
    job = engine_job(project)
    job["spec"] = job["spec"] | {"weights": str(broken)}
    settings = {"address": None, "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}
    with pytest.raises(PipelineError) as error, RayEngine(settings, job):
        pass
    message = str(error.value)
    assert message.startswith("a Ray worker cannot build MobileNetV2: cannot build MobileNetV2") and "\n" not in message
