"""The `tf.distribute` strategy that training and fine-tuning run under (`distribute.strategy`).

- `none`: TensorFlow's default strategy (one device).
- `mirrored`: synchronous data parallelism over this machine's GPUs; without GPUs, over
  `distribute.cpu_replicas` logical CPU devices (no faster on CPU, but the same code path as on GPUs).
- `multi_worker`: synchronous data parallelism across machines (`TF_CONFIG`): refused with one line, because
  Keras 3's `Model.fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585; tried here with
  two workers on 127.0.0.1: fit fails reducing its first batch, and, past that, reducing its metrics).
"""
from __future__ import annotations

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
    raise PipelineError(
        "distribute.strategy: multi_worker cannot train with Keras 3, whose Model.fit fails under "
        "MultiWorkerMirroredStrategy (keras-team/keras#20585); use none or mirrored"
    )
