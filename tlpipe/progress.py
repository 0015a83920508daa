"""Progress that tells the user what is happening, in a terminal and in a log file alike.

In a terminal: a tqdm bar redrawn in place. Anywhere else (a CI log, `dvc repro > log`): the same tqdm text
as whole lines, one every LOG_INTERVAL_S seconds, and none for work that ends sooner, instead of
carriage-return redraws that fill a log with hundreds of half-lines.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
# Batches timed in the first epoch, after its first (which also traces the graph), for a measured estimate.
TIMED_BATCHES = 3


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int | None, desc: str, unit: str = "img", stream: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A progress bar on stderr: redrawn in a terminal, a line every LOG_INTERVAL_S seconds elsewhere."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5, dynamic_ncols=True, **kwargs)
    # delay: work that ends within LOG_INTERVAL_S prints no progress at all, only the stage's own summary.
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,
        delay=LOG_INTERVAL_S,
        ncols=100,
        ascii=True,
        **kwargs,
    )


def duration(seconds: float) -> str:
    """A duration as people say it: 45 s, 12 min, 2.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fit_progress(desc: str, steps_per_epoch: int, epochs: int, stream: IO[str] | None = None) -> Any:
    """A Keras callback: progress within each epoch (bar()), then one line per epoch with its metrics.

    Keras' own verbose=1 redraws with carriage returns in logs, and verbose=2 says nothing until an epoch ends,
    which for a large backbone on a CPU is many minutes. Early in the first epoch it also prints the measured
    time per batch and what that means for the whole run.
    """
    import keras

    out = stream or sys.stderr

    class FitProgress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.progress: tqdm | None = None
            self.epoch = 0
            self.started = 0.0
            self.first_batch_done = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch = epoch
            self.started = time.perf_counter()
            self.progress = bar(steps_per_epoch, f"{desc} epoch {epoch + 1}/{epochs}", "batch", out, leave=False)

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.progress is not None:
                self.progress.update(batch + 1 - self.progress.n)
            if self.epoch != 0:
                return
            if batch == 0:
                self.first_batch_done = time.perf_counter()
            elif batch == TIMED_BATCHES and steps_per_epoch > TIMED_BATCHES + 1:
                per_batch = (time.perf_counter() - self.first_batch_done) / TIMED_BATCHES
                tqdm.write(
                    f"{desc}: measured {per_batch:.2f} s per batch: about {duration(per_batch * steps_per_epoch)} of "
                    f"training per epoch, {duration(per_batch * steps_per_epoch * epochs)} for {epochs} epochs "
                    "(plus validation)",
                    file=out,
                )

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.progress is not None:
                self.progress.close()
            shown = ", ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
            seconds = time.perf_counter() - self.started
            print(f"{desc} epoch {epoch + 1}/{epochs}: {shown} ({duration(seconds)})", file=out, flush=True)

    return FitProgress()


def dvclive_logger(log_dir: Path) -> Any:
    """A dvclive logger writing into `log_dir` (metrics.json and plots/metrics, declared in dvc.yaml)."""
    from dvclive import Live

    # dvcyaml=None: the pipeline's dvc.yaml already declares these plots; dvclive must not rewrite it.
    return Live(str(log_dir), dvcyaml=None, save_dvc_exp=False)


def dvclive_callback(log_dir: Path) -> Any:
    """Keras callback logging every epoch's metrics with dvclive into `log_dir` (plots declared in dvc.yaml)."""
    from dvclive.keras import DVCLiveCallback

    return DVCLiveCallback(live=dvclive_logger(log_dir))
