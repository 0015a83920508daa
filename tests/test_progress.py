"""Progress in logs: whole lines, no carriage-return redraws; Keras fits report within and after each epoch."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tlpipe import progress


def test_a_bar_in_a_log_writes_a_whole_line_per_interval_and_none_for_quick_work(monkeypatch) -> None:
    log = io.StringIO()
    with progress.bar(1000, "features@x", stream=log) as shown:
        for _ in range(100):
            shown.update(10)
    assert log.getvalue() == ""  # done within LOG_INTERVAL_S: the stage's own summary line says enough
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    with progress.bar(1000, "features@x", stream=log) as shown:
        for _ in range(4):
            time.sleep(0.06)
            shown.update(250)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 5, lines
    assert all(line.startswith("features@x: ") for line in lines)
    assert "1000/1000" in lines[-1]


def test_duration_reads_like_people_say_it() -> None:
    assert [progress.duration(s) for s in (4.4, 89, 600, 7920)] == ["4 s", "89 s", "10 min", "2.2 h"]


@pytest.mark.slow
def test_fit_progress_reports_the_measured_batch_time_and_every_epoch() -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(48, 4)), np.arange(48) % 2
    log = io.StringIO()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[progress.fit_progress("head", 6, 2, stream=log)])
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    measured = [line for line in lines if "measured" in line]
    assert len(measured) == 1 and "s per batch" in measured[0] and "for 2 epochs" in measured[0]
    epochs = [line for line in lines if line.startswith("head epoch ") and ": loss " in line]
    assert [line.split(":")[0] for line in epochs] == ["head epoch 1/2", "head epoch 2/2"]
