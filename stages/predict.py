"""Classify images with the shipped model: `python -m stages.predict PATH... [--format text|json|csv]`.

PATHs are image files or folders (searched recursively for image files). Each image gets one line with the
predicted class and its probability; a file that cannot be read gets its own error and the rest go on.
Exit code: 0 when every image was classified, 1 when any failed, 2 when the model cannot be loaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from stages.common import PipelineError, read_json
from stages.images import ImageRejected, is_tf_ready, open_image, to_rgb
from stages.models import inference_function, load_model

DEFAULT_MODEL = Path("models/model.keras")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None


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


def load_classifier(model_path: Path) -> tuple[Any, list[str]]:
    """The shipped model and its class names (models/labels.json beside it)."""
    labels = read_json(model_path.parent / "labels.json")["classes"]
    return load_model(model_path), labels


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

            decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
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
        probabilities = classify(pixels)
        best = int(probabilities.argmax())
        yield Prediction(
            str(path), labels[best], round(float(probabilities[best]), 6), [round(float(p), 6) for p in probabilities]
        )


def write_predictions(predictions: Iterable[Prediction], fmt: str, out: Any) -> list[Prediction]:
    """Print each prediction as it comes (text/csv) or all at the end (json); errors also go to stderr."""
    done: list[Prediction] = []
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(["path", "label", "probability", "error"])
    for prediction in predictions:
        done.append(prediction)
        if prediction.error:
            print(f"error: {prediction.path}: {prediction.error}", file=sys.stderr)
        if writer:
            writer.writerow([prediction.path, prediction.label or "", prediction.probability or "", prediction.error or ""])
        elif fmt == "text" and not prediction.error:
            print(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}", file=out)
        out.flush()
    if fmt == "json":
        json.dump([asdict(p) for p in done], out, indent=2)
        out.write("\n")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    try:
        model, labels = load_classifier(args.model)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    files = image_files(p for p in args.paths if p.exists())
    started = time.perf_counter()
    done = write_predictions(predict_files(model, labels, files), args.format, sys.stdout)
    for path in missing:
        print(f"error: {path}: no such file or folder", file=sys.stderr)
    classified = sum(p.error is None for p in done)
    failed = len(done) - classified + len(missing)
    if not done and not missing:
        print("error: no image files found in " + " ".join(map(str, args.paths)), file=sys.stderr)
        return 1
    print(f"{classified} classified, {failed} failed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
