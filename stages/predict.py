r"""Classify images with the shipped model: `tl-predict PATH... [--format text|json|csv] [--model FILE]`.

PATHs are image files or folders (searched recursively for image files). `tl-predict` is the console script
that `pip install -e .` (the README's setup) puts in the virtualenv's bin/, so it runs from any folder;
`python -m stages.predict` is the same command from the project root.

The model is --model, else models/model.keras in the current folder if there is one, else the project's own
models/model.keras. Its class names are read from labels.json beside it.

Output, on stdout:
  text  one line per image: `path<TAB>class<TAB>probability` (4 decimals). So that every image is exactly one
        line, a backslash, newline, carriage return or tab in a path or class name is written as `\\`, `\n`,
        `\r` or `\t`, and a byte of a file name that is not UTF-8 as `\xNN`.
  csv   a header, then path,label,probability (6 decimals),error; fields are quoted as RFC 4180 says.
  json  a list of {path, label, probability, probabilities, error} (probabilities to 8 decimals).
A file that cannot be read gets its own `error: PATH: REASON` line on stderr (escaped like text output) and the
rest go on. Exit code: 0 when every image was classified, 1 when any failed, 2 when the model or its
labels.json cannot be loaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np

from stages.common import SHIPPED_MODEL, PipelineError, read_json
from stages.images import ImageRejected, is_tf_ready, open_image, to_rgb
from stages.models import inference_function, load_model

# The parent of the `stages` package: where the pipeline writes models/model.keras.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
TEXT_DECIMALS = 4
CSV_DECIMALS = 6
# JSON carries whole probability rows, which programs score: at 8 decimals a row of even a thousand classes
# still sums to 1 within 1e-5 (scikit-learn's tolerance), and that is about all a float32 output holds.
JSON_DECIMALS = 8


@dataclass
class Prediction:
    """One image's result; probabilities at the model's full precision (rounded only when written out)."""

    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None


def default_model(cwd: Path, project_root: Path = PROJECT_ROOT) -> Path:
    """models/model.keras in `cwd` if it is there, else the one in the project that holds this code."""
    local = cwd / SHIPPED_MODEL
    return SHIPPED_MODEL if local.exists() else project_root / SHIPPED_MODEL


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (hidden ones skipped), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return found


def check_model_file(path: Path, remedy: str) -> None:
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a model file; pass the .keras file inside it")
    if not path.is_file():
        raise PipelineError(f"{path} not found; {remedy}")


def read_labels(model_path: Path) -> list[str]:
    """The class names in labels.json beside the model, in the order of the model's outputs."""
    path = model_path.parent / "labels.json"
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: the class names of {model_path.name} must be beside it; "
            "copy the labels.json that came with the model there, or run dvc repro"
        )
    data = read_json(path)
    classes = data.get("classes") if isinstance(data, dict) else None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise PipelineError(f"{path} has no `classes` list of class names; rerun dvc repro to rewrite it")
    return classes


def check_outputs(model: Any, labels: list[str], model_path: Path) -> None:
    expected = 1 if len(labels) == 2 else len(labels)  # two classes: one sigmoid output
    outputs = model.output_shape[-1]
    if outputs != expected:
        raise PipelineError(
            f"cannot use {model_path}: it has {outputs} outputs but labels.json names {len(labels)} classes; "
            "use the labels.json that came with the model"
        )


def load_classifier(model_path: Path, remedy: str = "run dvc repro to build it") -> tuple[Any, list[str]]:
    """The model and its class names (labels.json beside it); `remedy` says what to do when it is missing."""
    check_model_file(model_path, remedy)
    labels = read_labels(model_path)
    model = load_model(model_path)
    check_outputs(model, labels, model_path)
    return model, labels


def classifier_function(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One image (H, W, 3) -> class probabilities, compiled once for any image size."""
    import tensorflow as tf

    from stages.scoring import class_probabilities

    forward = inference_function(lambda image: model(image[tf.newaxis], training=False), (None, None, 3))
    return lambda image: class_probabilities(forward(image).numpy())[0]


def read_pixels(path: Path) -> np.ndarray:
    """Checked, upright 8-bit RGB pixels as float32.

    Files TensorFlow reads as they are go through the same decoder as training (tf.io.decode_image), so
    served pixels equal trained pixels; the rest (EXIF-rotated, CMYK, 16-bit, ...) are converted by Pillow.
    """
    image, info = open_image(path)
    try:
        if is_tf_ready(info):
            import tensorflow as tf

            # As bytes: a file name that is not UTF-8 cannot become a TensorFlow string otherwise.
            contents = tf.io.read_file(os.fsencode(path))
            decoded = tf.io.decode_image(contents, channels=3, expand_animations=False)
            return decoded.numpy().astype(np.float32)
        return np.asarray(to_rgb(image), dtype=np.float32)
    except ImageRejected:
        raise
    except Exception as error:  # a file Pillow accepted but TensorFlow or the RGB conversion did not
        raise ImageRejected(path, f"does not decode ({str(error).splitlines()[0] if str(error) else error!r})") from None
    finally:
        image.close()


def predict_files(model: Any, labels: list[str], files: Iterable[Path]) -> Iterator[Prediction]:
    classify = classifier_function(model)
    for path in files:
        try:
            pixels = read_pixels(path)
        except PipelineError as error:
            yield Prediction(str(path), error=getattr(error, "reason", str(error)))
            continue
        except OSError as error:
            yield Prediction(str(path), error=f"cannot read ({error.strerror or error})")
            continue
        # Unrounded: scores need rows that sum to 1, which rounding each of many small probabilities breaks.
        probabilities = [float(p) for p in classify(pixels)]
        best = int(np.argmax(probabilities))
        yield Prediction(str(path), labels[best], probabilities[best], probabilities)


def undecodable_bytes(text: str) -> str:
    """A file name's bytes that are not UTF-8 (Python keeps them as lone surrogates) as `\\xNN`."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


def escape(text: str) -> str:
    """`text` on one line: backslash, newline, carriage return and tab escaped as in a Python string."""
    return undecodable_bytes(text.translate(TEXT_ESCAPES))


def json_record(prediction: Prediction) -> dict[str, Any]:
    probabilities = prediction.probabilities
    return {
        "path": prediction.path,
        "label": prediction.label,
        "probability": None if prediction.probability is None else round(prediction.probability, JSON_DECIMALS),
        "probabilities": None if probabilities is None else [round(p, JSON_DECIMALS) for p in probabilities],
        "error": prediction.error,
    }


def csv_row(prediction: Prediction) -> list[str]:
    probability = "" if prediction.probability is None else f"{prediction.probability:.{CSV_DECIMALS}f}"
    # The csv module quotes separators and line breaks; only bytes that are not UTF-8 cannot be written.
    fields = [prediction.path, prediction.label or "", probability, prediction.error or ""]
    return [undecodable_bytes(field) for field in fields]


def text_line(prediction: Prediction) -> str:
    return f"{escape(prediction.path)}\t{escape(prediction.label or '')}\t{prediction.probability:.{TEXT_DECIMALS}f}"


def report_error(path: str | Path, reason: str) -> None:
    print(f"error: {escape(str(path))}: {escape(reason)}", file=sys.stderr)


def write_predictions(predictions: Iterable[Prediction], fmt: str, out: TextIO) -> list[Prediction]:
    """Print each prediction as it comes (text/csv) or all at the end (json); errors also go to stderr."""
    done: list[Prediction] = []
    # RFC 4180 line ends (\r\n): with them the csv module also quotes a lone \r inside a field.
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(["path", "label", "probability", "error"])
    for prediction in predictions:
        done.append(prediction)
        if prediction.error:
            report_error(prediction.path, prediction.error)
        if writer:
            writer.writerow(csv_row(prediction))
        elif fmt == "text" and not prediction.error:
            print(text_line(prediction), file=out)
        out.flush()
    if fmt == "json":
        json.dump([json_record(p) for p in done], out, indent=2)
        out.write("\n")
    return done


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-predict",
        description=__doc__.splitlines()[0],
        epilog="Exit code: 0 all classified, 1 some failed, 2 the model or its labels.json cannot be loaded.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model", type=Path, default=None,
        help=f"a .keras model with labels.json beside it (default: {SHIPPED_MODEL} in the current folder "
        f"if there is one, else {PROJECT_ROOT / SHIPPED_MODEL})",
    )
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    model_path = args.model or default_model(Path.cwd())
    try:
        model, labels = load_classifier(model_path, "run dvc repro (or pass --model)")
    except PipelineError as error:
        print(f"error: {escape(str(error))}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    files = image_files(p for p in args.paths if p.exists())
    started = time.perf_counter()
    done = write_predictions(predict_files(model, labels, files), args.format, sys.stdout)
    for path in missing:
        report_error(path, "no such file or folder")
    classified = sum(p.error is None for p in done)
    failed = len(done) - classified + len(missing)
    if not done and not missing:
        shown = " ".join(escape(str(p)) for p in args.paths)
        print(f"error: no image files found in {shown}", file=sys.stderr)
        return 1
    print(f"{classified} classified, {failed} failed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
