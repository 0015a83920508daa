"""Wall-clock time of one image through a model: what it costs where it is deployed.

Latency varies with the machine and its load, so the metric gate ignores it (`"latency_*"` in params.yaml
`regression:`), as it does images_per_second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Timed calls per measurement, after two warm-up calls: enough for a stable median and 95th percentile.
LATENCY_RUNS = 50


def latency_ms(run: Callable[[np.ndarray], Any], image: np.ndarray, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """Median and 95th percentile, in milliseconds, of `runs` calls of `run(image)`."""
    run(image)
    run(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(image)
        times.append(1000 * (time.perf_counter() - started))
    return {
        "latency_ms_p50": round(float(np.percentile(times, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 2),
    }
