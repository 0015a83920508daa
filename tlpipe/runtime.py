"""How TensorFlow runs: seeding for reproducible results, and the `tf.distribute` strategy (`distribute.strategy`).

- `none`: TensorFlow's default strategy (one device).
- `mirrored`: synchronous data parallelism over this machine's GPUs; without GPUs, over
  `distribute.cpu_replicas` logical CPU devices (no faster on CPU, but the same code path as on GPUs).

Training across machines is not offered: Keras 3's `Model.fit` does not run under
MultiWorkerMirroredStrategy (keras-team/keras#20585), and params.py says so to anyone who asks for it.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS reports it, as in a container)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have only the machine's count
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def configure_devices(settings: dict[str, Any]) -> None:
    """Split the CPU into `cpu_replicas` logical devices for `mirrored` without GPUs.

    Must run before anything else touches TensorFlow (seeding included): devices are fixed once created.
    """
    import tensorflow as tf

    if settings["strategy"] != "mirrored" or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * settings["cpu_replicas"])


def strategy_for(settings: dict[str, Any]) -> tf.distribute.Strategy:
    import tensorflow as tf

    if settings["strategy"] == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice())


def strategy_line(settings: dict[str, Any], strategy: tf.distribute.Strategy) -> str | None:
    """What a training stage says about its strategy: nothing for the default, one device."""
    if settings["strategy"] == "none":
        return None
    return f"training under {settings['strategy']} on {strategy.num_replicas_in_sync} replicas"
