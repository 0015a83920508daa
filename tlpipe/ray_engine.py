"""Feature extraction spread over a Ray cluster (`features.engine: ray`, settings in `features.ray`).

Each worker is a Ray actor that builds the frozen base once and runs the local engine's code over the
chunks of images the driver (the features stage) hands it. The driver reads the files and ships their
bytes, and ships a weights file's bytes, so the workers need neither the project's files nor a shared disk;
they need the same Python packages (docs/ray.md). The driver writes the cache, in the
format the local engine writes, and only once every chunk is back: a failed run leaves no half of one.

A worker that dies (killed, out of memory, its node lost) is restarted by Ray, which reruns its unfinished
chunks on it, up to WORKER_RESTARTS times; after that the stage fails with one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import tlpipe
from tlpipe import progress
from tlpipe.errors import PipelineError, first_line

WORKER_RESTARTS = 3
# Each task is this many of the stage's batches: big enough that Ray's per-task cost is small beside the
# forward pass, small enough that a lost worker costs little to redo.
BATCHES_PER_CHUNK = 4
# Per worker: one chunk running and one queued, so that no worker waits for the driver.
CHUNKS_AHEAD = 2
# Ray's own log lines from the workers would bury the stage's; the failure messages say where they are.
WORKER_LOGS = "/tmp/ray/session_latest/logs on the worker's node"


class ExtractorWorker:
    """A Ray actor: the frozen base, built once, over chunks of images. Any failure to build it is kept as
    one line for `ready` to report, instead of an actor that dies with a traceback."""

    def __init__(self, job: dict[str, Any], weights_file: bytes | None) -> None:
        self.failure: str | None = None
        self.weights_copy = "\0"  # matches nothing until there is one
        try:
            self.image_size, self.batch_size = job["spec"]["image_size"], job["batch_size"]
            self.forward = self._build(job, weights_file)
        except PipelineError as error:  # naming the driver's weights file, not this worker's copy of it
            self.failure = str(error).replace(self.weights_copy, str(job["spec"]["weights"]))
        except Exception as error:  # noqa: BLE001 - reported by ready() as one line
            self.failure = f"{type(error).__name__}: {first_line(error)}"

    def _build(self, job: dict[str, Any], weights_file: bytes | None) -> Callable[[Any], Any]:
        import tensorflow as tf

        from tlpipe.extraction import base_forward, load_extractor
        from tlpipe.runtime import seed_everything

        if job["threads"]:  # the CPUs Ray gave this worker, not every core of its node
            tf.config.threading.set_intra_op_parallelism_threads(job["threads"])
            tf.config.threading.set_inter_op_parallelism_threads(job["threads"])
        seed_everything(job["seed"])
        spec = dict(job["spec"])
        if weights_file is not None:  # the driver's weights file, written where this worker can read it
            folder = Path(tempfile.mkdtemp(prefix="tlpipe-weights-"))
            spec["weights"] = self.weights_copy = str(folder / Path(spec["weights"]).name)
            Path(spec["weights"]).write_bytes(weights_file)
        try:
            extractor, _ = load_extractor(job["key"], spec, job["seed"], job["precision"])
        finally:
            if weights_file is not None:
                shutil.rmtree(Path(spec["weights"]).parent, ignore_errors=True)
        return base_forward(extractor, spec["image_size"], job["n_images"])

    def ready(self) -> tuple[int, str | None]:
        """(this worker's process id, what went wrong building the base or None)."""
        return os.getpid(), self.failure

    def files(self, contents: list[bytes]) -> np.ndarray:
        from tlpipe.datasets import encoded_image_dataset

        batches = encoded_image_dataset(contents, self.image_size, self.batch_size)
        return np.concatenate([self.forward(images).numpy() for images in batches])

    def batches(self, images: np.ndarray) -> np.ndarray:
        return self.forward(images).numpy()


def weights_bytes(spec: dict[str, Any], named: tuple[str, ...]) -> bytes | None:
    """The weights file's contents when `spec` names a file (so workers get it), else None."""
    from tlpipe.params import resolve_weights

    weights = resolve_weights(spec["weights"], named)
    return None if weights is None or weights in named else Path(weights).read_bytes()


class RayEngine:
    """extraction.Engine on a Ray cluster; a context manager that connects, starts the workers, and stops
    them (and a Ray it started itself) on the way out.

    `settings` is params.yaml `features.ray`; `job` says what each worker builds: key, spec (the backbone's
    params), seed, precision, batch_size and n_images (the stage's total, for models.worth_freezing).
    `on_chunk`, when set, is called with the number of chunks done after each one (for progress, and for
    the test that kills a worker mid-run).
    """

    def __init__(self, settings: dict[str, Any], job: dict[str, Any]) -> None:
        self.settings, self.job = settings, job
        self.workers: list[Any] = []
        self.pids: list[int] = []
        self.on_chunk: Callable[[int], None] | None = None

    def __enter__(self) -> RayEngine:
        import ray

        address = self.settings["address"]
        if address:
            check_reachable(address)
        try:
            # Every log line of Ray's own goes to its log files; errors come back as exceptions.
            ray.init(
                address=address or "local",  # null: a new Ray here, even where RAY_ADDRESS is set
                num_cpus=None if address else self._wanted("CPU"),
                num_gpus=None if address else self._wanted("GPU"),
                include_dashboard=False,
                log_to_driver=False,
                logging_level="error",
                runtime_env={"py_modules": [str(Path(tlpipe.__file__).parent)]},
            )
        except (ConnectionError, ValueError, RuntimeError) as error:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise PipelineError(
                f"cannot start {where} (features.ray.address): {first_line(error).rstrip('.')}; "
                "start it (`ray start --head`) or set features.ray.address: null to run Ray on this machine"
            ) from None
        try:
            self._check_resources(ray.cluster_resources())
            self._start_workers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        ray.shutdown()

    def _wanted(self, resource: str) -> float:
        per_worker = self.settings["cpus_per_worker" if resource == "CPU" else "gpus_per_worker"]
        return self.settings["workers"] * per_worker

    def _check_resources(self, available: dict[str, float]) -> None:
        """Refuse, in one line, workers the cluster cannot place: Ray would wait for them forever."""
        for resource, name in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
            wanted, has = self._wanted(resource), available.get(resource, 0.0)
            if wanted > has:
                raise PipelineError(
                    f"features.ray asks for {self.settings['workers']} workers x {self.settings[name]} "
                    f"{resource}s = {wanted:g}, but the Ray cluster has {has:g}; lower features.ray.workers or "
                    f"features.ray.{name}, or add nodes"
                )

    def _start_workers(self) -> None:
        import ray

        from tlpipe.backbones import get_backbone

        spec = self.job["spec"]
        # Held for as long as the workers live: a restarted worker is built from it again.
        self.weights = ray.put(weights_bytes(spec, get_backbone(spec["arch"]).named_weights))
        gpus = self.settings["gpus_per_worker"]
        job = self.job | {"threads": worker_threads(self.settings)}
        actor = ray.remote(ExtractorWorker).options(
            num_cpus=self.settings["cpus_per_worker"],
            num_gpus=gpus,
            max_restarts=WORKER_RESTARTS,
            max_task_retries=WORKER_RESTARTS,
        )
        self.workers = [actor.remote(job, self.weights) for _ in range(self.settings["workers"])]
        states = self._get([worker.ready.remote() for worker in self.workers])
        if failure := next((failure for _, failure in states if failure), None):
            raise PipelineError(f"a Ray worker cannot build {spec['arch']}: {failure}")
        self.pids = [pid for pid, _ in states]

    def _get(self, refs: Any) -> Any:
        """ray.get, with a worker lost for good (restarts used up, or its node gone) as one line."""
        import ray

        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
            raise PipelineError(
                f"a Ray worker died {WORKER_RESTARTS + 1} times or lost its node ({first_line(error)}); "
                f"nothing was written. Its logs: {WORKER_LOGS}"
            ) from None
        except ray.exceptions.RayTaskError as error:
            raise PipelineError(f"a Ray worker failed: {first_line(error.cause or error)}") from None

    def files(self, paths: list[str], desc: str) -> np.ndarray:
        size = self.job["batch_size"] * BATCHES_PER_CHUNK
        chunks = (
            ("files", [read_image_file(path) for path in paths[start : start + size]])
            for start in range(0, len(paths), size)
        )
        return self._run(chunks, len(paths), desc)

    def batches(self, batches: Iterable[Any], n_images: int, desc: str) -> np.ndarray:
        return self._run((("batches", np.asarray(images)) for images in batches), n_images, desc)

    def _run(self, chunks: Iterator[tuple[str, Any]], n_images: int, desc: str) -> np.ndarray:
        """Every chunk's features, in order. Each worker has at most CHUNKS_AHEAD chunks; the next goes to
        whichever has fewest, so a slow worker gets less."""
        import ray

        results: dict[int, np.ndarray] = {}
        running: dict[Any, tuple[int, int]] = {}  # ref -> (chunk index, worker index)
        load = [0] * len(self.workers)
        numbered = enumerate(chunks)
        with progress.bar(n_images, desc) as shown:
            while True:
                while len(running) < CHUNKS_AHEAD * len(self.workers) and (chunk := next(numbered, None)):
                    index, (method, payload) = chunk
                    worker = load.index(min(load))
                    running[getattr(self.workers[worker], method).remote(payload)] = (index, worker)
                    load[worker] += 1
                if not running:
                    break
                [done], _ = ray.wait(list(running), num_returns=1)
                index, worker = running.pop(done)
                load[worker] -= 1
                results[index] = self._get(done)
                shown.update(len(results[index]))
                if self.on_chunk:
                    self.on_chunk(len(results))
        return np.concatenate([results[index] for index in range(len(results))])


def worker_threads(settings: dict[str, Any]) -> int:
    """TensorFlow threads for a worker of features.ray `settings`: its share of CPUs, rather than every core of
    its node; 0 (TensorFlow's choice) on a GPU, where the CPU only feeds it."""
    return 0 if settings["gpus_per_worker"] else max(1, int(settings["cpus_per_worker"]))


def read_image_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PipelineError(f"cannot read {path} ({error.strerror}); rerun dvc repro prepare") from None


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in one line, at once, when nothing listens at a host:port address: Ray itself retries for
    minutes, printing warnings, before it gives up. `auto` is left to Ray, which fails fast."""
    import socket

    from tlpipe.params import host_and_port

    if address == "auto":
        return
    try:
        socket.create_connection(host_and_port(address), timeout=timeout).close()
    except OSError as error:
        raise PipelineError(
            f"no Ray cluster answers at {address} (features.ray.address): {error.strerror or error}; start one "
            "(`ray start --head`) or set features.ray.address: null to run Ray on this machine"
        ) from None
