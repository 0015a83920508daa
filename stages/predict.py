r"""Classify images with the shipped model: `tl-predict PATH... [--format text|json|csv] [--model FILE]
[--batch-size N] [--max-pixels N]`.

PATHs are image files or folders (searched recursively for image files). `tl-predict` is the console script
that `pip install -e .` (the README's setup) puts in the virtualenv's bin/, so it runs from any folder;
`python -m stages.predict` is the same command from the project root.

The model is --model, else the shipped one: models/model.keras in the current folder if there is one, else the
project's own; or rather, of it and its float exports that the export stage checked against it and kept
(metrics/export.json, while dvc.lock says they were made from the model there now), the one whose measured
latency is lowest: exports/model.onnx in ONNX Runtime or exports/model.tflite in LiteRT give the same
probabilities (to a thousandth), faster on most CPUs (benchmarks/predict.py). The last line on stderr names
the model that ran, and why. Class names are read from labels.json beside the model. --model also takes a
quantized export (exports/model_int8.tflite, exports/model_float16.tflite), never chosen by default.

Images are decoded ahead of the model by a thread per core and classified --batch-size at a time (default
16); results print as each batch is done. --batch-size 1 classifies each image at its own size, as the model
was called before batching; batched results equal it to 1e-5. Each file is decoded once, in 8-bit, and
resized before it becomes float32; the images held ahead of the model are bounded in bytes as well as in
number, so a few huge files are decoded one after another instead of all at once.

An image with more pixels than --max-pixels is refused before it is decoded, with its own error line. The
default is `data.max_image_pixels` of params.yaml in the current folder if it sets one, else of the project's
params.yaml (the limit training applied), else Pillow's default.

Output, on stdout:
  text  one line per image: `path<TAB>class<TAB>probability` (4 decimals). So that every image is exactly one
        line, a backslash, newline, carriage return or tab in a path or class name is written as `\\`, `\n`,
        `\r` or `\t`, and a byte of a file name that is not UTF-8 as `\xNN`.
  csv   a header, then path,label,probability (6 decimals),error; fields are quoted as RFC 4180 says.
  json  a list of {path, label, probability, probabilities, error} (probabilities to 8 decimals).
A file that cannot be read gets its own `error: PATH: REASON` line on stderr (escaped like text output) and the
rest go on. Exit code: 0 when every image was classified, 1 when any failed, 2 when the model or its
labels.json cannot be loaded, or params.yaml's pixel limit is not a whole number above 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tlpipe.errors import PipelineError
from tlpipe.images import pixel_limit
from tlpipe.output_formats import escape, report_error, write_predictions
from tlpipe.paths import SHIPPED_MODEL
from tlpipe.prediction import (
    PREDICT_BATCH,
    PROJECT_ROOT,
    ModelChoice,
    default_max_pixels,
    default_model,
    fastest_checked_model,
    image_files,
    load_classifier,
    predict_files,
    read_temperature,
)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-predict",
        # The whole first paragraph: its first line alone would end inside the usage's backticks.
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Exit code: 0 all classified, 1 some failed, 2 the model or its labels.json cannot be loaded "
        "(or params.yaml's data.max_image_pixels is invalid).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"a .keras model, or its .tflite or .onnx export, with labels.json beside it (default: {SHIPPED_MODEL} in the current folder "
        f"if there is one, else {PROJECT_ROOT / SHIPPED_MODEL}; or its fastest float export that metrics/export.json says "
        "gives the same probabilities)",
    )
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=PREDICT_BATCH,
        help=f"images classified per call (default {PREDICT_BATCH}); 1: one at a time, each at its own size",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="refuse images with more pixels than this (default: data.max_image_pixels of params.yaml in the "
        "current folder, else of the project's params.yaml, else Pillow's default)",
    )
    parser.add_argument(
        "--uncalibrated",
        action="store_true",
        help="print the model's own probabilities, without the temperature (labels.json) fitted on validation",
    )
    return parser


def positive_int(text: str) -> int:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    if args.model:
        choice = ModelChoice(args.model, "--model")
    else:
        choice = fastest_checked_model(default_model(Path.cwd()))
    model_path = choice.path
    try:
        classifier = load_classifier(model_path, "run dvc repro (or pass --model)")
        temperature = 1.0 if args.uncalibrated else read_temperature(model_path)
        max_pixels = args.max_pixels or default_max_pixels(Path.cwd())
    except PipelineError as error:
        print(f"error: {escape(str(error))}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    files = image_files(p for p in args.paths if p.exists())
    started = time.perf_counter()
    with pixel_limit(max_pixels):
        predictions = predict_files(classifier, files, temperature, args.batch_size)
        classified, failed = write_predictions(predictions, args.format, sys.stdout)
    for path in missing:
        report_error(path, "no such file or folder")
    failed += len(missing)
    if not files and not missing:
        shown = " ".join(escape(str(p)) for p in args.paths)
        print(f"error: no image files found in {shown}", file=sys.stderr)
        return 1
    print(
        f"{classified} classified, {failed} failed in {time.perf_counter() - started:.1f} s by "
        f"{escape(str(model_path))} in {classifier.runtime} ({escape(choice.reason)})",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
