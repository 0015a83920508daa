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
  memory stays flat.
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

from benchmarks.benchmark import PROJECT_ROOT
from benchmarks.export import markdown, shipped_model, validation_names
from tlpipe import export, prediction
from tlpipe.inference import one_image

WEIGHTS = "weights/mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
LABELS = ["cats", "dogs"]


def extract_images(shared: Path, folder: Path, n: int) -> list[Path]:
    """The first n validation images of the shared zip, cats and dogs alternating, as files in `folder`."""
    with zipfile.ZipFile(shared / "data" / "cats_and_dogs_filtered.zip") as archive:
        chosen = validation_names(archive, n)
        archive.extractall(folder, chosen)
    return [folder / name for name in chosen]


def save_models(folder: Path, shared: Path) -> dict[str, Path]:
    """models/model.keras and exports/model.tflite, exports/model.onnx, each with its labels.json."""
    spec = {"arch": "MobileNetV2", "image_size": 224, "weights": str(shared / WEIGHTS)}
    model = shipped_model(spec)
    labels = json.dumps({"classes": LABELS, "image_size": spec["image_size"], "temperature": 1.0})
    models, exports = folder / "models", folder / "exports"
    models.mkdir()
    exports.mkdir()
    model.save(models / "model.keras")
    (models / "labels.json").write_text(labels)
    (exports / "labels.json").write_text(labels)
    if failed := export.export_formats(model, ["tflite", "onnx"], exports):
        sys.exit(f"export failed: {failed}")
    return {"keras": models / "model.keras", "tflite": exports / "model.tflite", "onnx": exports / "model.onnx"}


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


def cli_run(model: Path, folder: Path) -> dict[str, float]:
    """tl-predict on `folder` in a fresh process: seconds to its first line, seconds in all, peak RSS."""
    started = time.perf_counter()
    command = [sys.executable, "-c", PEAK_RSS_REPORT, str(folder), "--model", str(model)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("SHARED_DIR", PROJECT_ROOT.parent / "shared"))
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--files", type=int, nargs="*", default=[], help="also run tl-predict over this many files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = extract_images(args.shared, folder / "images", args.images)
        n = len(files)
        paths = save_models(folder, args.shared)
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
                    "of_keras_ceiling": None,
                    "max_difference_vs_one_at_a_time": float(
                        f"{np.abs(probabilities(predictions) - singly).max():.2g}"
                    ),
                    "max_difference_vs_keras": float(f"{np.abs(probabilities(predictions) - reference).max():.2g}"),
                }
            )
            print(rows[-1], flush=True)
        keras_ceiling = rows[0]["ceiling_images_per_s"]
        for row in rows:
            row["of_keras_ceiling"] = round(row["images_per_s"] / keras_ceiling, 2)
        print(f"today (.keras, one image at a time): {today:.1f} images/s over {n} images")
        print(markdown(rows, list(rows[0])))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, capture_output=True)
        print(f"import tensorflow alone, in a fresh process: {time.perf_counter() - started:.1f} s")
        for name in ("keras", "tflite"):
            print(paths[name].name, "tl-predict", cli_run(paths[name], folder / "images"), flush=True)
        for count in args.files:
            many = linked_copies(files, folder / f"many-{count}", count)
            print("model.tflite tl-predict", cli_run(paths["tflite"], many), flush=True)


if __name__ == "__main__":
    main()
