"""Stage export: the shipped model in each format of params.yaml `export.formats` (exports/), each run over the
scored test images by its own runtime and compared with models/model.keras (metrics/export.json).

A format that does not convert, does not run, or misses its parity bar (tlpipe/export.py) gets one line and
is left out of exports/; the others are still written and checked. exports/labels.json is the shipped
labels.json: the class names of the outputs, and the temperature that calibrates them.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tlpipe.datasets import read_manifest, scored_test_rows
from tlpipe.errors import PipelineError, stage_main
from tlpipe.export import (
    FORMATS,
    KERAS,
    Runner,
    artifact_size,
    export_formats,
    failure_reason,
    load_runner,
    parity,
    parity_problem,
    run_all,
)
from tlpipe.files import atomic_dir, megabytes, write_json
from tlpipe.inference import one_image
from tlpipe.latency import latency_ms
from tlpipe.params import load_params
from tlpipe.paths import EXPORT_METRICS, EXPORTS_DIR, SHIPPED_LABELS, SHIPPED_MODEL
from tlpipe.prediction import load_classifier, read_pixels
from tlpipe.progress import bar


@stage_main
def main() -> None:
    params = load_params()
    names = params["export"]["formats"]
    classifier = load_classifier(SHIPPED_MODEL)
    test_rows, _ = scored_test_rows(read_manifest())
    paths, y_true = [Path(p) for p in test_rows["path"]], test_rows["label_index"].to_numpy()
    with atomic_dir(EXPORTS_DIR) as folder:
        print(f"export: converting {SHIPPED_MODEL} to {', '.join(names)}", file=sys.stderr)
        failed = export_formats(
            classifier.model, names, folder, log=lambda line: print(f"export: {line}", file=sys.stderr)
        )
        runners = {KERAS: one_image(classifier.batch_function(len(paths)))} | load_runners(names, folder, failed)
        first = read_pixels(paths[0])  # also the image the latencies are measured on
        with bar(len(paths), "export: every format over the test images", "img") as progress:
            probabilities, failed_runs = run_all(runners, decoded(paths, first, progress.update))
        if KERAS in failed_runs:
            raise PipelineError(f"{SHIPPED_MODEL} {failed_runs[KERAS]}")
        failed |= failed_runs
        results = scores(probabilities, y_true, runners, first, folder, failed)
        shutil.copyfile(SHIPPED_LABELS, folder / SHIPPED_LABELS.name)
    for name, reason in failed.items():
        print(f"export: {name} not exported: {reason}", file=sys.stderr)
    write_json(
        EXPORT_METRICS,
        {"backbone": params["model"], "n_test": len(paths), **results, "failed": dict(sorted(failed.items()))},
    )
    for name, row in results.items():
        if name not in failed:
            print(f"export: {name}: {summary(row)}", file=sys.stderr)


def load_runners(names: list[str], folder: Path, failed: dict[str, str]) -> dict[str, Runner]:
    """Each converted format in its runtime; one that does not load is added to `failed`."""
    runners = {}
    for name in (n for n in names if n not in failed):
        try:
            runners[name] = load_runner(name, folder / FORMATS[name].path)
        except Exception as error:  # noqa: BLE001 - a runtime's error is that format's failure
            failed[name] = f"does not load in {FORMATS[name].runtime}: {failure_reason(error)}"
    return runners


def scores(
    probabilities: dict[str, np.ndarray],
    y_true: np.ndarray,
    runners: dict[str, Runner],
    image: np.ndarray,
    folder: Path,
    failed: dict[str, str],
) -> dict[str, dict]:
    """Parity, size and latency of the .keras model and each format. A format that misses its bar is added to
    `failed` and its artifact deleted; its scores stay, to show by how much it missed."""
    reference = probabilities[KERAS]
    results = {KERAS: parity(reference, reference, y_true) | {"size_bytes": SHIPPED_MODEL.stat().st_size}}
    results[KERAS] |= latency_ms(runners[KERAS], image)
    for name in (n for n in probabilities if n != KERAS):
        row = parity(reference, probabilities[name], y_true)
        if problem := parity_problem(name, row, results[KERAS]["accuracy"]):
            failed[name] = problem
        artifact = folder / FORMATS[name].path
        results[name] = row | {"size_bytes": artifact_size(artifact)}
        if name in failed:
            shutil.rmtree(artifact) if artifact.is_dir() else artifact.unlink()
        else:
            results[name] |= latency_ms(runners[name], image)
    return results


def decoded(paths: list[Path], first: np.ndarray, done: Callable[[], object]) -> Iterator[np.ndarray]:
    """Each image's pixels, in order; `first` is paths[0], decoded already."""
    for index, path in enumerate(paths):
        yield first if index == 0 else read_pixels(path)
        done()


def summary(scores: dict[str, float]) -> str:
    return (
        f"accuracy {scores['accuracy']:.4f}, agreement {scores['agreement']:.4f}, "
        f"max probability difference {scores['max_probability_difference']:.2g}, "
        f"{megabytes(scores['size_bytes'])}, {scores['latency_ms_p50']:.1f} ms per image"
    )


if __name__ == "__main__":
    main()
