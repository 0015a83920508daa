"""The `tf.distribute` strategy that training and fine-tuning run under (`distribute.strategy`).

- `none`: TensorFlow's default strategy (one device).
- `mirrored`: synchronous data parallelism over this machine's GPUs; without GPUs, over
  `distribute.cpu_replicas` logical CPU devices (no faster on CPU, but the same code path as on GPUs).
- `multi_worker`: synchronous data parallelism across machines, each described by `TF_CONFIG`.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from stages.common import PipelineError

if TYPE_CHECKING:
    import tensorflow as tf


def configure_devices(settings: dict[str, Any]) -> None:
    """Split the CPU into `cpu_replicas` logical devices for `mirrored` without GPUs.

    Must run before anything else touches TensorFlow (seeding included): devices are fixed once created.
    """
    import tensorflow as tf

    if settings["strategy"] != "mirrored" or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * settings["cpu_replicas"]
    )


def strategy_for(settings: dict[str, Any]) -> "tf.distribute.Strategy":
    import tensorflow as tf

    name = settings["strategy"]
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise PipelineError(
            "distribute.strategy is multi_worker but TF_CONFIG is not set; set it on every worker "
            "(see tf.distribute.MultiWorkerMirroredStrategy) or use none or mirrored"
        )
    try:
        json.loads(config)
    except json.JSONDecodeError as error:
        raise PipelineError(f"TF_CONFIG is not valid JSON ({error}); fix it or use distribute.strategy: none") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
