"""The code paths taken only when TensorFlow sees a GPU. No GPU is attached here, and TensorFlow cannot make
a logical GPU out of a CPU, so TensorFlow's device lists are replaced by ones that name two GPUs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

GPUS = [
    SimpleNamespace(name="/device:GPU:0", device_type="GPU"),
    SimpleNamespace(name="/device:GPU:1", device_type="GPU"),
]


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    for lister in ("list_logical_devices", "list_physical_devices"):
        real = getattr(tf.config, lister)
        monkeypatch.setattr(tf.config, lister, lambda kind=None, real=real: GPUS if kind == "GPU" else real(kind))


def images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 255, (10 + index, 12, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_with_a_gpu_the_tf_data_autotuner_sets_parallelism_and_prefetch(two_gpus: None, tmp_path: Path) -> None:
    import tensorflow as tf

    from tlpipe.datasets import image_dataset

    paths = images(tmp_path, 7)
    tuned = image_dataset(paths, 8, 3)
    explicit = image_dataset(paths, 8, 3, autotune=False)
    assert tuned.options().autotune.enabled is not False and explicit.options().autotune.enabled is False
    assert "Prefetch" in type(tuned).__name__ and "Prefetch" not in type(explicit).__name__
    for a, b in zip(tuned, explicit, strict=True):  # the same batches, in the same order
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert tf.config.list_logical_devices("GPU") == GPUS


def test_with_a_gpu_bfloat16_is_never_called_emulated(two_gpus: None, tmp_path: Path) -> None:
    from tlpipe.extraction import bfloat16_notice

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 fma\n")  # no bfloat16 arithmetic on the CPU
    assert bfloat16_notice("bfloat16", cpuinfo) is None


def test_without_a_gpu_the_same_cpu_gets_the_bfloat16_notice(tmp_path: Path) -> None:
    from tlpipe.extraction import bfloat16_notice

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 fma\n")
    assert "no bfloat16 arithmetic" in (bfloat16_notice("bfloat16", cpuinfo) or "")


def test_mirrored_with_gpus_uses_every_gpu_and_leaves_the_cpu_whole(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    from tlpipe.runtime import configure_devices, strategy_for

    split: list[Any] = []
    monkeypatch.setattr(tf.config, "set_logical_device_configuration", lambda *args: split.append(args))
    made: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda *args, **kwargs: made.append((args, kwargs)))
    settings = {"strategy": "mirrored", "cpu_replicas": 2}
    configure_devices(settings)
    strategy_for(settings)
    assert split == []  # the CPU is split into logical devices only when there is no GPU
    assert made == [((["/device:GPU:0", "/device:GPU:1"],), {})]  # all GPUs, NCCL's default reduction


def test_a_ray_worker_with_a_gpu_leaves_tensorflows_threads_alone() -> None:
    """With gpus_per_worker, a worker's CPU threads are TensorFlow's to set; without, its share of CPUs."""
    from tlpipe.ray_engine import worker_threads

    assert worker_threads({"cpus_per_worker": 2, "gpus_per_worker": 1}) == 0
    assert worker_threads({"cpus_per_worker": 2, "gpus_per_worker": 0}) == 2
    assert worker_threads({"cpus_per_worker": 0.5, "gpus_per_worker": 0}) == 1
