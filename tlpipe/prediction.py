"""Classifying image files with a shipped model: what `tl-predict` and the evaluate_model stage both run.

The model is a .keras file, or one of its exports (.tflite, .onnx), with labels.json (its class names) beside
it. Images are checked and decoded as in training, and probabilities are kept at full precision: the output
formats round them.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from tlpipe.errors import PipelineError, first_line
from tlpipe.files import read_json
from tlpipe.images import ImageRejected, is_tf_ready, open_image, to_rgb
from tlpipe.inference import RUNTIME_OF_SUFFIX, TENSORFLOW, Outputs, keras_outputs, runtime_outputs
from tlpipe.models import load_model
from tlpipe.paths import EXPORT_METRICS, EXPORTS_DIR, SHIPPED_MODEL
from tlpipe.progress import bar
from tlpipe.runtime import usable_cores
from tlpipe.scoring import class_probabilities
from tlpipe.statistics import apply_temperature

# The parent of the `tlpipe` package: where the pipeline writes models/model.keras.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# Images classified per call. Batches amortise each call's fixed cost where cores are many; on two cores
# LiteRT and ONNX Runtime run about as fast at 1 as at 32 (benchmarks/predict.py), and a small batch keeps
# the first line quick.
PREDICT_BATCH = 16
# Images decoded ahead of the model, at least: enough that a slow file does not leave the model idle.
DECODE_AHEAD = 32
# Bytes of images held by the decoders and the queue ahead of the model. Counting images alone let four
# 9400 x 9400 files, each a few hundred MB decoded, be held at once; a file bigger than this on its own is
# decoded alone, so that every image under the pixel limit can still be classified.
DECODE_BUDGET = 256 * 2**20
# Bytes a pixel takes while decoding: Pillow keeps RGB in 4 bytes a pixel (TensorFlow in 3).
DECODING_BYTES_PER_PIXEL = 4
FLOAT_BYTES_PER_PIXEL = 3 * 4  # an RGB pixel as float32
# Pillow's own limit (its default, as in params.yaml): what predict refuses outside a project.
DEFAULT_MAX_PIXELS = 89478485


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


@dataclass(frozen=True)
class ModelChoice:
    """The model tl-predict runs, and why that one (printed before it runs)."""

    path: Path
    reason: str


def fastest_checked_model(keras_model: Path) -> ModelChoice:
    """`keras_model` (a project's models/model.keras), or the export of it that runs fastest with the same answers.

    A candidate is an export the export stage kept in metrics/export.json: float formats only (a quantized one
    passes a looser bar, up to a point of accuracy, so it is chosen only by --model), that predict can run
    (.tflite, .onnx), whose file is there with labels.json beside it. Exports count only while dvc.lock says
    the export stage checked the models/model.keras that is there now: a model shipped since has not been
    checked. Fastest is the lowest one-image latency measured by the export stage, the .keras model's included.
    """
    from tlpipe.export import FORMATS, KERAS

    project = keras_model.parent.parent
    metrics_file = project / EXPORT_METRICS
    if not metrics_file.is_file():
        return ModelChoice(keras_model, f"no {EXPORT_METRICS} to choose a faster export from (dvc repro export)")
    if not checked_by_export_stage(project, keras_model):
        return ModelChoice(keras_model, f"the exports were checked against another {SHIPPED_MODEL} (dvc repro export)")
    try:
        results = read_json(metrics_file)
        latencies = {KERAS: (keras_model, float(results[KERAS]["latency_ms_p50"]))}
        for name, fmt in FORMATS.items():
            path = project / EXPORTS_DIR / fmt.path
            row = results.get(name)
            usable = path.suffix in RUNTIME_OF_SUFFIX and path.is_file() and (path.parent / "labels.json").is_file()
            if usable and isinstance(row, dict) and not fmt.quantized and name not in results.get("failed", {}):
                latencies[name] = (path, float(row["latency_ms_p50"]))
    except (PipelineError, OSError, ValueError, TypeError, KeyError):
        return ModelChoice(keras_model, f"{metrics_file} is unreadable (dvc repro export)")
    name, (path, latency) = min(latencies.items(), key=lambda item: item[1][1])
    if name == KERAS:
        return ModelChoice(keras_model, f"no checked export is faster ({EXPORT_METRICS})")
    keras_latency = latencies[KERAS][1]
    return ModelChoice(
        path,
        f"the fastest export checked against {SHIPPED_MODEL} in {EXPORT_METRICS}: {latency:.1f} ms per image "
        f"against {keras_latency:.1f} ms; --model {SHIPPED_MODEL} runs the .keras model",
    )


def checked_by_export_stage(project: Path, keras_model: Path) -> bool:
    """Whether dvc.lock records `keras_model`, as it is now, among the export stage's dependencies."""
    import hashlib

    try:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        deps = lock["stages"]["export"]["deps"]
        recorded = next(dep["md5"] for dep in deps if Path(dep["path"]) == SHIPPED_MODEL)
        digest = hashlib.md5(usedforsecurity=False)
        with keras_model.open("rb") as file:
            while chunk := file.read(2**20):
                digest.update(chunk)
    except (OSError, yaml.YAMLError, TypeError, KeyError, StopIteration):
        return False
    return digest.hexdigest() == recorded


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (hidden ones skipped), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return found


def default_max_pixels(cwd: Path, project_root: Path = PROJECT_ROOT) -> int:
    """The pixel limit: `data.max_image_pixels` of params.yaml in `cwd` if it sets one, else of the project
    that holds this code, else Pillow's default; training refused bigger images, so predict does too."""
    for path in (cwd / "params.yaml", project_root / "params.yaml"):
        if not path.is_file():
            continue
        try:
            params = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise PipelineError(f"cannot read {path}: {first_line(error)}; fix it or pass --max-pixels") from None
        data = params.get("data") if isinstance(params, dict) else None
        if not isinstance(data, dict) or "max_image_pixels" not in data:
            continue
        value = data["max_image_pixels"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PipelineError(
                f"{path}: data.max_image_pixels must be a whole number above 0, got {value!r}; "
                "fix it or pass --max-pixels"
            )
        return value
    return DEFAULT_MAX_PIXELS


def check_model_file(path: Path, remedy: str) -> None:
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a model file; pass the .keras, .tflite or .onnx file inside it")
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


def read_temperature(model_path: Path) -> float:
    """The temperature predict applies (read_calibration)."""
    return read_calibration(model_path)["temperature"]


def read_calibration(model_path: Path) -> dict[str, Any]:
    """`temperature` (applied), `temperature_fitted`, `temperature_p_value` and `temperature_source` from
    labels.json beside the model (evaluation.held_out_calibration); a model shipped before calibration
    existed has none: temperature 1."""
    path = model_path.parent / "labels.json"
    data = read_json(path)
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise PipelineError(f"{path}: temperature must be a number above 0, got {temperature!r}; rerun dvc repro")
    return {
        "temperature": float(temperature),
        "temperature_fitted": float(data.get("temperature_fitted", temperature)),
        "temperature_p_value": float(data.get("temperature_p_value", 1.0)),
        "temperature_source": str(data.get("temperature_source", "validation")),
    }


@dataclass(frozen=True)
class Classifier:
    """A model file loaded in its runtime, with its class names.

    `image_size` (height, width) is the size the model resizes every image to first: images resized to it
    beforehand can share a batch, and the model's own resize then leaves them as they are. None: one image at
    a time. `model` is the Keras model of a .keras file; an export has `outputs` instead.
    """

    labels: list[str]
    runtime: str
    image_size: tuple[int, int] | None
    model: Any = None
    outputs: Outputs | None = None

    def batch_function(self, n_images: int) -> Callable[[np.ndarray], np.ndarray]:
        """A batch [n, H, W, 3] of raw RGB -> class probabilities [n, classes]; `n_images` is how many images
        it will see (a Keras model freezes its weights where that pays: models.worth_freezing)."""
        outputs = self.outputs or keras_outputs(self.model, n_images)
        return lambda images: class_probabilities(outputs(images))


def check_outputs(outputs: int | None, labels: list[str], model_path: Path) -> None:
    expected = 1 if len(labels) == 2 else len(labels)  # two classes: one sigmoid output
    if outputs is not None and outputs != expected:
        raise PipelineError(
            f"cannot use {model_path}: it has {outputs} outputs but labels.json names {len(labels)} classes; "
            "use the labels.json that came with the model"
        )


def load_classifier(model_path: Path, remedy: str = "run dvc repro to build it") -> Classifier:
    """The model in its runtime, by suffix (.tflite: LiteRT, .onnx: ONNX Runtime, else Keras), with its class
    names (labels.json beside it); `remedy` says what to do when the file is missing."""
    check_model_file(model_path, remedy)
    labels = read_labels(model_path)
    runtime = RUNTIME_OF_SUFFIX.get(model_path.suffix.lower())
    if runtime is None:
        model = load_model(model_path)
        check_outputs(model.output_shape[-1], labels, model_path)
        return keras_classifier(model, labels)
    try:
        outputs, width = runtime_outputs(runtime, model_path)
    except Exception as error:  # noqa: BLE001 - a damaged file: each runtime raises its own error type
        raise PipelineError(
            f"cannot load {model_path} in {runtime}: {first_line(error).rstrip('.')}; export it again (dvc repro)"
        ) from None
    check_outputs(width, labels, model_path)
    size = read_json(model_path.parent / "labels.json").get("image_size")
    image_size = (size, size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    return Classifier(labels, runtime, image_size, outputs=outputs)


def keras_classifier(model: Any, labels: list[str]) -> Classifier:
    """A Keras model in memory as a Classifier."""
    return Classifier(labels, TENSORFLOW, resizing_size(model), model=model)


def resizing_size(model: Any) -> tuple[int, int] | None:
    """(height, width) of the Resizing layer the model applies first to its raw input (the shipped model's
    `resize`), or None."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    first = layers[0] if layers else None
    return (first.height, first.width) if isinstance(first, keras.layers.Resizing) else None


def decode(path: Path) -> Any:
    """Checked, upright 8-bit RGB pixels [H, W, 3] (uint8), each file decoded once.

    Files TensorFlow reads as they are go through the same decoder as training (tf.io.decode_image), so
    served pixels equal trained pixels, and stay TensorFlow's tensor: a NumPy copy would hold them twice. The
    rest (EXIF-rotated, CMYK, 16-bit, ...) are converted by Pillow, to a NumPy array. Pixels stay 8-bit: a
    float32 copy at full size would take four times the memory.
    """
    image, info = open_image(path, decode_tf_ready=False)
    try:
        if is_tf_ready(info):
            return tf_decoded(path)
        return np.asarray(to_rgb(image))
    except ImageRejected:
        raise
    except Exception as error:  # a file Pillow accepted but TensorFlow or the RGB conversion did not
        raise ImageRejected(
            path, f"does not decode ({str(error).splitlines()[0] if str(error) else error!r})"
        ) from None
    finally:
        image.close()


def tf_decoded(path: Path) -> Any:
    """TensorFlow's decoding of a file is_tf_ready accepts; where it fails, Pillow's decoding names why
    (truncated, ...), which only TensorFlow's generic message would otherwise hide."""
    import tensorflow as tf

    try:
        # As bytes: a file name that is not UTF-8 cannot become a TensorFlow string otherwise.
        contents = tf.io.read_file(os.fsencode(path))
        return tf.io.decode_image(contents, channels=3, expand_animations=False)
    except tf.errors.OpError:
        open_image(path)[0].close()  # raises ImageRejected with Pillow's reason, if it has one
        raise


def read_pixels(path: Path) -> np.ndarray:
    """decode's pixels as float32 at full size: an image as the model is given it at --batch-size 1."""
    return np.asarray(decode(path)).astype(np.float32)


def at_own_size(width: int, height: int, size: tuple[int, int] | None) -> bool:
    """Whether --batch-size 1 gives the model this image at its own size, as float32: unless that copy would
    exceed DECODE_BUDGET and the model's input size is known, so that it can be resized first."""
    return size is None or width * height * FLOAT_BYTES_PER_PIXEL <= DECODE_BUDGET


def read_own_size(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """An image as --batch-size 1 gives it to the model: at its own size (at_own_size), else resized first as
    the model's Resizing layer would (the same kernel), so that a huge image never becomes a full-size float32
    array."""
    pixels = decode(path)
    if at_own_size(int(pixels.shape[1]), int(pixels.shape[0]), size):
        return np.asarray(pixels).astype(np.float32)
    return resized(pixels, size)


def resized(pixels: Any, size: tuple[int, int]) -> np.ndarray:
    """What the shipped model's Resizing layer does first (bilinear, as keras.layers.Resizing), done here so
    that images of any size can share a batch. 8-bit pixels are resized as they are: the same kernel reads
    them as floats, so only the resized image is ever float32."""
    import tensorflow as tf

    return tf.image.resize(pixels, size).numpy().astype(np.float32, copy=False)


def read_resized(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A file decoded once and resized as the model would, float32 at the model's input size."""
    return resized(decode(path), size)


def decoding_bytes(path: Path, one_at_a_time: bool, size: tuple[int, int] | None) -> int:
    """An estimate, from the file's header, of the bytes one image holds while it is decoded and after:
    its decoded pixels, and its float32 copy where the model gets the image at its own size (one at a time,
    at_own_size). 0 for a file whose header does not open: it is refused before it is decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - the decoder names what is wrong; this is only an estimate
        return 0
    float_copy = FLOAT_BYTES_PER_PIXEL if one_at_a_time and at_own_size(width, height, size) else 0
    return width * height * (DECODING_BYTES_PER_PIXEL + float_copy)


def read_or_reason(read: Callable[[Path], np.ndarray], path: Path) -> np.ndarray | str:
    """The decoded image, or why it cannot be classified (one file's error: the others go on)."""
    try:
        return read(path)
    except PipelineError as error:
        return getattr(error, "reason", str(error))
    except OSError as error:
        return f"cannot read ({error.strerror or error})"


def predict_files(
    classifier: Classifier, files: Sequence[Path], temperature: float = 1.0, batch_size: int = PREDICT_BATCH
) -> Iterator[Prediction]:
    """One Prediction per file, in order; probabilities temperature-scaled (statistics.apply_temperature).

    Files are decoded by a thread per core, ahead of the model, and classified `batch_size` at a time, each
    resized first as the model itself would (a model whose input size is unknown: one at a time, at its own
    size). Memory holds the list of paths and the images decoded ahead, DECODE_BUDGET bytes of them at most
    (DecodeQueue), however many files there are and however large. Pillow's pixel limit (images.pixel_limit)
    refuses an image before it is decoded.
    """
    if classifier.image_size is None:
        batch_size = 1
    size, one_at_a_time = classifier.image_size, batch_size == 1
    reader = read_own_size if one_at_a_time else read_resized
    read = lambda path: reader(path, size)  # noqa: E731
    cost = lambda path: decoding_bytes(path, one_at_a_time, size)  # noqa: E731
    classify = classifier.batch_function(len(files))
    chunks = (files[i : i + batch_size] for i in range(0, len(files), batch_size))
    for chunk, decoded in decoded_ahead(read, chunks, max(2, -(-DECODE_AHEAD // batch_size)), cost):
        images = [image for image in decoded if not isinstance(image, str)]
        # Unrounded: scores need rows that sum to 1, which rounding each of many small probabilities breaks.
        raw = iter(classify(np.stack(images)) if images else [])
        for path, image in zip(chunk, decoded):
            if isinstance(image, str):
                yield Prediction(str(path), error=image)
                continue
            probabilities = next(raw)
            if temperature != 1.0:
                probabilities = apply_temperature(probabilities[np.newaxis], temperature)[0]
            probabilities = [float(p) for p in probabilities]
            best = int(np.argmax(probabilities))
            yield Prediction(str(path), classifier.labels[best], probabilities[best], probabilities)


@dataclass(eq=False)
class QueuedFile:
    """A file in a DecodeQueue; `bytes` is its header's estimate until it is decoded, then the decoded size."""

    path: Path
    bytes: int
    future: Future | None = None


class DecodeQueue:
    """Files decoded by a pool of threads ahead of the model, handed back in order, a chunk at a time.

    Files are submitted in order while the bytes held (decoding, decoded, and the chunk last handed back, which
    its caller is still classifying) stay within `budget`: counting images alone would let a few huge ones take
    gigabytes. The next file goes ahead alone when nothing is held, so an image bigger than the budget is still
    decoded; and a chunk is completed even over the budget, since its images are classified together (they
    are small once decoded and resized).
    """

    def __init__(
        self, pool: ThreadPoolExecutor, read: Callable[[Path], np.ndarray], cost: Callable[[Path], int], budget: int
    ) -> None:
        self.pool, self.read, self.cost, self.budget = pool, read, cost, budget
        self.chunks: deque[list[QueuedFile]] = deque()
        self.waiting: deque[QueuedFile] = deque()  # not yet submitted, in order
        self.running: list[QueuedFile] = []  # submitted, still counted at their estimate
        self.held = 0
        self.peak = 0  # the most bytes held at once
        # The chunk last handed back is still held while its caller classifies it, until it asks for the next.
        self.handed_back = 0

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, chunk: Sequence[Path]) -> None:
        queued = [QueuedFile(path, self.cost(path)) for path in chunk]
        self.chunks.append(queued)
        self.waiting.extend(queued)
        self.submit_fitting()

    def pop(self) -> tuple[Sequence[Path], list[np.ndarray | str]]:
        """The oldest chunk's paths and images (read_or_reason); waits for them to be decoded."""
        self.held -= self.handed_back
        self.handed_back = 0
        head = self.chunks.popleft()
        while head[-1].future is None:  # make room: wait for decodes in order, or go over if none is left
            if self.running:
                self.settle(self.running[0])
            else:
                self.start(self.waiting.popleft())
            self.submit_fitting()
        results = [queued.future.result() for queued in head]
        for queued in head:
            if queued in self.running:
                self.settle(queued)
        self.handed_back = sum(queued.bytes for queued in head)
        self.submit_fitting()
        return [queued.path for queued in head], results

    def submit_fitting(self) -> None:
        for queued in [q for q in self.running if q.future.done()]:
            self.settle(queued)
        while self.waiting and (not self.held or self.held + self.waiting[0].bytes <= self.budget):
            self.start(self.waiting.popleft())

    def start(self, queued: QueuedFile) -> None:
        queued.future = self.pool.submit(read_or_reason, self.read, queued.path)
        self.running.append(queued)
        self.held += queued.bytes
        self.peak = max(self.peak, self.held)

    def settle(self, queued: QueuedFile) -> None:
        """Count a decoded file at its decoded size instead of its estimate (waits for it)."""
        result = queued.future.result()
        decoded = result.nbytes if isinstance(result, np.ndarray) else 0
        self.held += decoded - queued.bytes
        queued.bytes = decoded
        self.running.remove(queued)


def decoded_ahead(
    read: Callable[[Path], np.ndarray],
    chunks: Iterable[Sequence[Path]],
    ahead: int,
    cost: Callable[[Path], int] = lambda path: 0,
    budget: int = DECODE_BUDGET,
) -> Iterator[tuple[Sequence[Path], list[np.ndarray | str]]]:
    """Each chunk with its images (read_or_reason), in order, decoded by a thread per core; up to `ahead`
    chunks decode while the caller classifies, and no more than that, nor more bytes than DecodeQueue
    allows (`cost`: a file's estimated bytes), is held."""
    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        queue = DecodeQueue(pool, read, cost, budget)
        for chunk in chunks:
            queue.add(chunk)
            if len(queue) > ahead:
                yield queue.pop()
        while queue:
            yield queue.pop()


def class_difference(labels: list[str], classes: list[str]) -> str:
    """How the model's classes differ from the data's, short enough for one line with hundreds of classes."""
    if len(labels) != len(classes):
        return f"was trained on {len(labels)} classes, the data has {len(classes)}"
    index = next(i for i, (label, name) in enumerate(zip(labels, classes)) if label != name)
    return f"was trained on other classes: its class {index} is {labels[index]!r}, the data's is {classes[index]!r}"


def predict_with_progress(classifier: Classifier, paths: list[Path]) -> list[Prediction]:
    """predict_files over `paths`, with a progress bar: a large backbone on a CPU takes minutes."""
    predictions = []
    with bar(len(paths), "evaluate_model", "img") as progress:
        for prediction in predict_files(classifier, paths):
            predictions.append(prediction)
            progress.update()
    return predictions
