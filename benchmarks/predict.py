"""Batched predict against one image at a time and against the in-memory ceiling: `python -m benchmarks.predict`.

It builds MobileNetV2 as finetune ships it (the shared ImageNet weights, a head fitted on nothing: the head
does not change the cost), saves it as models/model.keras with its labels.json, exports it to TFLite float32
and ONNX (tlpipe.export), and extracts the first N validation images of the shared zip (default 1000, cats
and dogs alternating). Then, in one run, so that the ratios hold whatever the machine's speed that day:
- today: the .keras model one image at a time, each decoded then classified in turn (predict before batching);
- batched: predict_files, tl-predict's path, for each model file; and the largest difference of its
  probabilities from the same file classified one image at a time, each at its own size;
- ceiling: the same runtime on the same images already decoded and resized in memory, at batch 1 and at
  predict's batch size, the faster of the two;
- tl-predict as a user runs it (a subprocess, on the folder): seconds to its first line and in all, and its
  peak RSS, beside the seconds a fresh process takes to import TensorFlow alone (which tl-predict needs to
  decode as training does); `--files N` repeats the test images (hard links) up to N files, to show that
  memory stays flat;
- memory and speed against a baseline (`--baseline REV`, a git revision, copied out with `git archive`):
  tl-predict's peak RSS on four 9400 x 9400 PNGs (under the pixel limit, a few hundred KB each, a few hundred
  MB each decoded) and on the test images, and predict_files' images/s on the test images (the better of two
  runs each), each run by the baseline's code and by this code in turn, in fresh processes. This part keeps
  its own machine, date and seconds; `--baseline-only` measures it alone and keeps the rest of the file.

Writes benchmarks/predict.json and its tables into docs/export.md and docs/performance.md (the `predict` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import (
    PROJECT_ROOT,
    Block,
    benchmark_parser,
    code_at,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from benchmarks.export import shipped_model, validation_names
from tests.helpers import SHARED_DIR
from tests.synthetic import synthetic_image
from tlpipe import export, prediction

NAME = "predict"
PAGES = ("docs/export.md", "docs/performance.md")
WEIGHTS = "weights/mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
LABELS = ["cats", "dogs"]
LARGE_SIDE = 9400
LARGE_FILES = 4


def extract_images(shared: Path, folder: Path, n: int) -> list[Path]:
    """The first n validation images of the shared zip, cats and dogs alternating, as files in `folder`."""
    with zipfile.ZipFile(shared / "data" / "cats_and_dogs_filtered.zip") as archive:
        chosen = validation_names(archive, n)
        archive.extractall(folder, chosen)
    return [folder / name for name in chosen]


def save_models(folder: Path, shared: Path, exports: bool = True) -> dict[str, Path]:
    """models/model.keras and exports/model.tflite, exports/model.onnx, each with its labels.json
    (`exports` False: the .keras model alone)."""
    spec = {"arch": "MobileNetV2", "image_size": 224, "weights": str(shared / WEIGHTS)}
    model = shipped_model(spec)
    labels = json.dumps({"classes": LABELS, "image_size": spec["image_size"], "temperature": 1.0})
    models, exported = folder / "models", folder / "exports"
    models.mkdir()
    exported.mkdir()
    model.save(models / "model.keras")
    (models / "labels.json").write_text(labels)
    (exported / "labels.json").write_text(labels)
    if not exports:
        return {"keras": models / "model.keras"}
    if failed := export.export_formats(model, ["tflite", "onnx"], exported):
        sys.exit(f"export failed: {failed}")
    return {"keras": models / "model.keras", "tflite": exported / "model.tflite", "onnx": exported / "model.onnx"}


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--images", type=int, default=1000, help="validation images of the shared zip")
    parser.add_argument("--files", type=int, nargs="*", default=[], help="also run tl-predict over this many files")
    parser.add_argument(
        "--baseline", default="HEAD", help="git revision whose tl-predict the memory and speed are compared with"
    )
    parser.add_argument(
        "--baseline-only",
        action="store_true",
        help=f"measure only the comparison with --baseline, keeping the rest of {NAME}.json",
    )
    return parser


def rate(n: int, work: Callable[[], Any]) -> tuple[float, Any]:
    """(images per second, what `work` returned)."""
    started = time.perf_counter()
    result = work()
    return n / (time.perf_counter() - started), result


def ceiling(classifier: prediction.Classifier, images: np.ndarray) -> float:
    """Images/s of the runtime alone on decoded, resized images in memory: the faster of batch 1 and
    predict's batch."""
    classify = classifier.batch_function(len(images))
    best = 0.0
    for batch in (1, prediction.PREDICT_BATCH):
        classify(images[:batch])
        work = lambda b=batch: [classify(images[i : i + b]) for i in range(0, len(images), b)]  # noqa: E731
        best = max(best, rate(len(images), work)[0])
    return best


def probabilities(predictions: list[prediction.Prediction]) -> np.ndarray:
    if failed := [p for p in predictions if p.error]:
        sys.exit(f"{failed[0].path}: {failed[0].error}")
    return np.array([p.probabilities for p in predictions])


# tl-predict in a child that reports its own peak RSS as it exits: the kernel's ru_maxrss of a child also
# counts the parent's memory, which the child shares until it execs.
PEAK_RSS_REPORT = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))); "
    "sys.argv[0] = 'tl-predict'; runpy.run_module('stages.predict', run_name='__main__')"
)


def cli_run(model: Path, folder: Path, code: Path = PROJECT_ROOT) -> dict[str, float]:
    """tl-predict on `folder` in a fresh process: seconds to its first line, seconds in all, peak RSS; `code`:
    the folder whose stages/ and tlpipe/ it runs."""
    started = time.perf_counter()
    command = [sys.executable, "-c", PEAK_RSS_REPORT, str(folder), "--model", str(model)]
    process = subprocess.Popen(command, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    first_s = time.perf_counter() - started
    lines = 1 + sum(1 for _ in process.stdout)
    stderr = process.stderr.read()
    if process.wait() != 0 or not first:
        sys.exit(f"tl-predict failed ({process.returncode}): {stderr.strip()[-500:]}")
    peak_kb = int(stderr.rsplit("VmHWM:", 1)[1].split()[0])
    return {
        "files": lines,
        "first_line_s": round(first_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_kb / 1024),
    }


def linked_copies(files: list[Path], folder: Path, n: int) -> Path:
    """`n` files in `folder`, hard links of `files` in turn: as many images as asked, for no disk."""
    folder.mkdir()
    for index in range(n):
        source = files[index % len(files)]
        os.link(source, folder / f"{index:07d}{source.suffix}")
    return folder


# predict_files' images/s on the files listed in argv[2:] with the model argv[1], in a fresh process of the
# code in its working folder (the first batch, which builds the model's function, before the clock starts).
SPEED_REPORT = """
import sys, time
from pathlib import Path
from tlpipe import prediction
classifier = prediction.load_classifier(Path(sys.argv[1]))
files = [Path(f) for f in sys.argv[2:]]
list(prediction.predict_files(classifier, files[: prediction.PREDICT_BATCH]))
started = time.perf_counter()
results = list(prediction.predict_files(classifier, files))
assert not any(r.error for r in results), [r.error for r in results if r.error][:3]
print(len(files) / (time.perf_counter() - started))
"""


def speed_run(model: Path, files: list[Path], code: Path) -> float:
    """Images/s of predict_files of the code in `code` (SPEED_REPORT)."""
    command = [sys.executable, "-c", SPEED_REPORT, str(model), *map(str, files)]
    result = subprocess.run(command, cwd=code, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"predict_files failed in {code}: {result.stderr.strip()[-500:]}")
    return float(result.stdout.split()[-1])


def large_images(folder: Path) -> list[Path]:
    """LARGE_FILES PNGs of LARGE_SIDE x LARGE_SIDE: a synthetic picture enlarged in flat blocks, so each
    file is small and its decoded pixels are not."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for index in range(LARGE_FILES):
        small = synthetic_image(index % 2, rng, 47)
        paths.append(folder / f"large-{index}.png")
        small.resize((LARGE_SIDE, LARGE_SIDE), Image.Resampling.NEAREST).save(paths[-1])
    return paths


def against_baseline(revision: str, folder: Path, model: Path, files: list[Path]) -> dict[str, Any]:
    """Peak RSS of tl-predict on the large PNGs and on `files`, and predict_files' images/s on `files` (the
    better of two runs, alternating, so that a busy spell slows both), for the baseline's code and this code,
    in turn; stamped with the machine, the date and its seconds."""
    started = time.perf_counter()
    commit = code_at(revision, folder / "baseline", ("stages", "tlpipe"))
    large = large_images(folder / "large")
    codes = {"baseline": folder / "baseline", "now": PROJECT_ROOT}
    out: dict[str, Any] = stamp() | {
        "baseline": commit,
        "large_files": len(large),
        "large_side": LARGE_SIDE,
        "large_file_kb": round(max(path.stat().st_size for path in large) / 1024),
    }
    for name, code in codes.items():
        out[f"large_peak_rss_mb_{name}"] = cli_run(model, folder / "large", code)["peak_rss_mb"]
        out[f"photos_peak_rss_mb_{name}"] = cli_run(model, files[0].parent, code)["peak_rss_mb"]
        print(out, flush=True)
    speeds: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(2):
        for name, code in codes.items():
            speeds[name].append(speed_run(model, files, code))
    for name in codes:
        out[f"photos_images_per_s_{name}"] = round(max(speeds[name]), 1)
    out["photos_speed_ratio"] = round(out["photos_images_per_s_now"] / out["photos_images_per_s_baseline"], 2)
    return out | {"seconds": round(time.perf_counter() - started, 1)}


def measure_baseline_only(shared: Path, n_images: int, baseline: str) -> dict[str, Any]:
    """against_baseline alone, on the .keras model and the first `n_images` validation images."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = extract_images(shared, folder / "images", n_images)
        return against_baseline(baseline, folder, save_models(folder, shared, exports=False)["keras"], files)


def measure(shared: Path, n_images: int, file_counts: list[int], baseline: str = "HEAD") -> dict[str, Any]:
    from tlpipe.inference import one_image

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = extract_images(shared, folder / "images", n_images)
        n = len(files)
        paths = save_models(folder, shared)
        classifiers = {name: prediction.load_classifier(path) for name, path in paths.items()}
        keras = classifiers["keras"]
        one = one_image(keras.batch_function(n))
        one(prediction.read_pixels(files[0]))  # compiled before the clock starts, as in the batched path
        today, reference = rate(n, lambda: np.array([one(prediction.read_pixels(path)) for path in files]))
        size = keras.image_size
        resized = np.stack([prediction.resized(prediction.read_pixels(path), size) for path in files])
        rows = []
        for name, classifier in classifiers.items():
            batched, predictions = rate(n, lambda c=classifier: list(prediction.predict_files(c, files)))
            singly = reference
            if name != "keras":
                singly = probabilities(list(prediction.predict_files(classifier, files, batch_size=1)))
            top = ceiling(classifier, resized)
            rows.append(
                {
                    "model": paths[name].name,
                    "runtime": classifier.runtime,
                    "images_per_s": round(batched, 1),
                    "vs_today": round(batched / today, 2),
                    "ceiling_images_per_s": round(top, 1),
                    "of_ceiling": round(batched / top, 2),
                    "max_difference_vs_one_at_a_time": float(
                        f"{np.abs(probabilities(predictions) - singly).max():.2g}"
                    ),
                    "max_difference_vs_keras": float(f"{np.abs(probabilities(predictions) - reference).max():.2g}"),
                }
            )
            print(rows[-1], flush=True)
        for row in rows:
            row["of_keras_ceiling"] = round(row["images_per_s"] / rows[0]["ceiling_images_per_s"], 2)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, capture_output=True)
        import_s = round(time.perf_counter() - started, 1)
        runs = [{"model": paths[name].name} | cli_run(paths[name], folder / "images") for name in ("keras", "tflite")]
        for count in file_counts:
            runs.append(
                {"model": paths["tflite"].name}
                | cli_run(paths["tflite"], linked_copies(files, folder / f"many-{count}", count))
            )
            print(runs[-1], flush=True)
        memory = against_baseline(baseline, folder, paths["keras"], files)
    return {
        "images": n,
        "today_images_per_s": round(today, 1),
        "rows": rows,
        "import_tensorflow_s": import_s,
        "cli": runs,
        "memory": memory,
    }


ROW_COLUMNS = {
    "model": "model",
    "runtime": "runtime",
    "images_per_s": "images/s",
    "vs_today": "vs `.keras` one at a time",
    "ceiling_images_per_s": "ceiling (images/s)",
    "of_ceiling": "of its ceiling",
    "of_keras_ceiling": "of TensorFlow's ceiling",
    "max_difference_vs_one_at_a_time": "largest difference from one at a time",
    "max_difference_vs_keras": "largest difference from `.keras`",
}
CLI_COLUMNS = {
    "model": "`tl-predict --model`",
    "files": "files",
    "first_line_s": "first line (s)",
    "total_s": "in all (s)",
    "peak_rss_mb": "peak RSS (MB)",
}


def memory_table(report: dict[str, Any]) -> str:
    """The baseline's tl-predict against this one: peak RSS on huge and on normal images, and speed."""
    memory = report["memory"]
    side = f"{memory['large_side']:,} x {memory['large_side']:,}"
    rows = [
        {
            "case": f"{memory['large_files']} PNGs of {side} ({memory['large_file_kb']:,} KB each), peak RSS (MB)",
            "baseline": f"{memory['large_peak_rss_mb_baseline']:,}",
            "now": f"{memory['large_peak_rss_mb_now']:,}",
        },
        {
            "case": f"{report['images']:,} validation images, peak RSS (MB)",
            "baseline": f"{memory['photos_peak_rss_mb_baseline']:,}",
            "now": f"{memory['photos_peak_rss_mb_now']:,}",
        },
        {
            "case": f"{report['images']:,} validation images, images/s (`predict_files`)",
            "baseline": memory["photos_images_per_s_baseline"],
            "now": f"{memory['photos_images_per_s_now']} ({memory['photos_speed_ratio']:.2f} x)",
        },
    ]
    columns = {"case": "`tl-predict`, `model.keras`", "baseline": f"at {memory['baseline']}", "now": "now"}
    return "\n".join(
        [
            f"{measured(memory, NAME)}: memory and speed against `tl-predict` before each image was decoded once "
            f"and resized in 8-bit (commit {memory['baseline']}), each run in a fresh process, the baseline's "
            f"and this code's in turn; images/s is the better of two runs. This part took "
            f"{memory['seconds'] / 60:.0f} minutes.",
            "",
            markdown(rows, columns, left=1),
        ]
    )


def table(report: dict[str, Any]) -> str:
    today = {
        "model": "`model.keras`, one image at a time",
        "runtime": "TensorFlow",
        "images_per_s": report["today_images_per_s"],
        "vs_today": 1.0,
    }
    ratios = ("vs_today", "of_ceiling", "of_keras_ceiling")
    rows = [today | {"vs_today": "1.00"}] + [
        r | {"model": f"`{r['model']}`, batched"} | {key: f"{r[key]:.2f}" for key in ratios} for r in report["rows"]
    ]
    cli = [
        r | {"model": f"`{r['model']}`", "files": f"{r['files']:,}", "peak_rss_mb": f"{r['peak_rss_mb']:,}"}
        for r in report["cli"]
    ]
    return "\n".join(
        [
            f"{measured(report, NAME)}: MobileNetV2 as `finetune` ships it, on the first {report['images']:,} "
            "validation images of `cats_and_dogs_filtered`; the ceiling is the same runtime on the same images "
            f"already decoded and resized in memory. The run took {report['seconds'] / 60:.0f} minutes.",
            "",
            markdown(rows, ROW_COLUMNS, left=2),
            "",
            f"`tl-predict` as a user runs it, in a fresh process (importing TensorFlow alone took "
            f"{report['import_tensorflow_s']} s in the same run):",
            "",
            markdown(cli, CLI_COLUMNS),
            *(["", memory_table(report)] if "memory" in report else []),
        ]
    )


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(page, NAME): table(report) for page in PAGES}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    elif args.baseline_only:
        report = load_results(NAME) | {"memory": measure_baseline_only(args.shared, args.images, args.baseline)}
        save_results(NAME, report)
    else:
        started = time.perf_counter()
        results = measure(args.shared, args.images, args.files, args.baseline)
        report = stamp() | {"seconds": round(time.perf_counter() - started, 1)} | results
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()
