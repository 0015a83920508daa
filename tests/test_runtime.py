"""Seeding and the default strategy: what every training stage starts with."""

from __future__ import annotations

import random

import numpy as np

from tlpipe.runtime import configure_devices, seed_everything, strategy_for


def draws() -> tuple[float, float, list[float]]:
    import tensorflow as tf

    return random.random(), float(np.random.rand()), tf.random.uniform((3,)).numpy().tolist()


def test_the_same_seed_gives_the_same_draws_and_another_seed_other_ones() -> None:
    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert draws() != first


def test_strategy_none_is_tensorflows_default_on_the_one_device() -> None:
    import tensorflow as tf

    settings = {"strategy": "none", "cpu_replicas": 2}
    configure_devices(settings)  # nothing to split for `none`
    strategy = strategy_for(settings)
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    assert len(tf.config.list_logical_devices("CPU")) == 1
