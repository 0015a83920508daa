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
    artifact_size,
    export_formats,
    failure_reason,
    load_runner,
    parity,
    parity_problem,
    run_all,
)
from tlpipe.files import atomic_dir, write_json
from tlpipe.latency import latency_ms
from tlpipe.params import load_params
from tlpipe.paths import EXPORT_METRICS, EXPORTS_DIR, SHIPPED_LABELS, SHIPPED_MODEL
from tlpipe.prediction import classifier_function, load_classifier, read_pixels
from tlpipe.progress import bar

KERAS = "keras"


@stage_main
def main() -> None:
    params = load_params()
    names = params["export"]["formats"]
    model, _ = load_classifier(SHIPPED_MODEL)
    test_rows, _ = scored_test_rows(read_manifest())
    paths, y_true = [Path(p) for p in test_rows["path"]], test_rows["label_index"].to_numpy()
    with atomic_dir(EXPORTS_DIR) as folder:
        print(f"export: converting {SHIPPED_MODEL} to {', '.join(names)}", file=sys.stderr)
        failed = export_formats(model, names, folder, log=lambda line: print(f"export: {line}", file=sys.stderr))
        runners = {KERAS: classifier_function(model, len(paths))}
        for name in (n for n in names if n not in failed):
            try:
                runners[name] = load_runner(name, folder / FORMATS[name].path)
            except Exception as error:  # noqa: BLE001 - a runtime's error is that format's failure
                failed[name] = f"does not load in {FORMATS[name].runtime}: {failure_reason(error)}"
        with bar(len(paths), "export: every format over the test images", "img") as progress:
            probabilities, failed_runs = run_all(runners, decoded(paths, progress.update))
        if KERAS in failed_runs:
            raise PipelineError(f"{SHIPPED_MODEL} {failed_runs[KERAS]}")
        failed |= failed_runs
        reference, first_image = probabilities.pop(KERAS), read_pixels(paths[0])
        results = {KERAS: parity(reference, reference, y_true) | {"size_bytes": SHIPPED_MODEL.stat().st_size}}
        results[KERAS] |= latency_ms(runners[KERAS], first_image)
        for name, rows in probabilities.items():
            scores = parity(reference, rows, y_true)
            if problem := parity_problem(name, scores, results[KERAS]["accuracy"]):
                failed[name] = problem
            artifact = folder / FORMATS[name].path
            results[name] = scores | {"size_bytes": artifact_size(artifact)}
            if name in failed:
                shutil.rmtree(artifact) if artifact.is_dir() else artifact.unlink()
            else:
                results[name] |= latency_ms(runners[name], first_image)
        shutil.copyfile(SHIPPED_LABELS, folder / SHIPPED_LABELS.name)
    for name, reason in failed.items():
        print(f"export: {name} not exported: {reason}", file=sys.stderr)
    write_json(
        EXPORT_METRICS,
        {"backbone": params["model"], "n_test": len(paths), **results, "failed": dict(sorted(failed.items()))},
    )
    for name, scores in results.items():
        if name not in failed:
            print(f"export: {name}: {summary(scores)}", file=sys.stderr)


def decoded(paths: list[Path], done: Callable[[], object]) -> Iterator[np.ndarray]:
    for path in paths:
        yield read_pixels(path)
        done()


def summary(scores: dict[str, float]) -> str:
    return (
        f"accuracy {scores['accuracy']:.4f}, agreement {scores['agreement']:.4f}, "
        f"max probability difference {scores['max_probability_difference']:.2g}, "
        f"{scores['size_bytes'] / 1e6:.1f} MB, {scores['latency_ms_p50']:.1f} ms per image"
    )


if __name__ == "__main__":
    main()
