"""Predict's memory: the pixel limit (--max-pixels, else params.yaml's data.max_image_pixels), each file
decoded once and resized before it becomes float32, and the images decoded ahead bounded in bytes."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from stages import predict
from tests.synthetic import encode, synthetic_image
from tlpipe import prediction
from tlpipe.images import open_image

CLASSES = ["apples", "kiwis", "plums"]


def small_model(side: int = 8) -> object:
    """Raw RGB of any size -> Resizing -> average -> softmax: the shipped model's interface."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(side, side)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shipped") / "model.keras"
    small_model().save(path)
    (path.parent / "labels.json").write_text(json.dumps({"classes": CLASSES}))
    return path


def write_png(path: Path, side: int, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(synthetic_image(index, np.random.default_rng(index), side), "PNG"))
    return path


def test_an_image_over_max_pixels_gets_its_own_error_and_the_rest_are_classified(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small = [write_png(tmp_path / f"{index}.png", 24, index) for index in range(3)]
    large = write_png(tmp_path / "large.png", 40)
    files = [small[0], large, small[1], small[2]]
    assert predict.main([*map(str, files), "--model", str(model_path), "--max-pixels", "1000"]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == list(map(str, small))
    assert err.splitlines()[0].startswith(f"error: {large}: too many pixels (") and "1000" in err, err
    assert err.splitlines()[1].startswith("3 classified, 1 failed")


def test_the_projects_max_image_pixels_is_the_default(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """params.yaml in the current folder sets the limit; --max-pixels overrides it; a bad value is one line."""
    monkeypatch.chdir(tmp_path)
    image = write_png(tmp_path / "a.png", 40)
    Path("params.yaml").write_text("data:\n  max_image_pixels: 1000\n")
    assert predict.main([str(image), "--model", str(model_path)]) == 1
    assert "a.png: too many pixels" in capsys.readouterr().err
    assert predict.main([str(image), "--model", str(model_path), "--max-pixels", "1600"]) == 0
    capsys.readouterr()
    Path("params.yaml").write_text("data:\n  max_image_pixels: lots\n")
    assert predict.main([str(image), "--model", str(model_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {Path.cwd() / 'params.yaml'}: data.max_image_pixels must be a whole number above 0")
    assert "got 'lots'; fix it or pass --max-pixels" in err and err.count("\n") == 1


def test_max_pixels_falls_back_to_the_projects_then_pillows(tmp_path: Path) -> None:
    here, project = tmp_path / "here", tmp_path / "project"
    here.mkdir()
    project.mkdir()
    assert prediction.default_max_pixels(here, project) == prediction.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    (project / "params.yaml").write_text("data:\n  max_image_pixels: 5000\n")
    (here / "params.yaml").write_text("seed: 1\n")  # another project's: no data.max_image_pixels
    assert prediction.default_max_pixels(here, project) == 5000


def test_a_large_image_never_becomes_float32_at_full_size(tmp_path: Path) -> None:
    """Batched, a file is decoded in 8-bit and resized before it is float32: NumPy never holds its full-size
    float32 copy (which --batch-size 1 does hold: the model gets the image at its own size)."""
    large = write_png(tmp_path / "large.png", 1500)
    full_float = 1500 * 1500 * 3 * 4
    tracemalloc.start()
    try:
        resized = prediction.read_resized(large, (8, 6))
        batched_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        prediction.read_pixels(large)
        single_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert resized.shape == (8, 6, 3) and resized.dtype == np.float32
    assert single_peak >= full_float  # the measure sees a full-size float32 array where there is one
    assert batched_peak < full_float / 10


def test_a_file_tensorflow_reads_is_not_decoded_by_pillow_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEG and PNG files TensorFlow decodes as training does are only checked by Pillow (a PNG's EXIF is
    found in its chunk list, not by decoding); an EXIF-rotated PNG is still decoded, and turned, by Pillow."""
    loads: list[str] = []
    original = ImageFile.ImageFile.load

    def counting_load(image: ImageFile.ImageFile):  # noqa: ANN202
        loads.append(image.format)
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    files = [write_png(tmp_path / "a.png", 30)]
    files.append(tmp_path / "b.jpg")
    files[-1].write_bytes(encode(synthetic_image(1, np.random.default_rng(1), 30), "JPEG"))
    for path in files:
        assert prediction.decode(path).shape == (30, 30, 3)
    assert loads == []
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright picture is 20 wide, 30 high
    rotated = tmp_path / "rotated.png"
    Image.new("RGB", (30, 20)).save(rotated, exif=exif)
    assert open_image(rotated, decode_tf_ready=False)[1].orientation == 6
    assert np.asarray(prediction.decode(rotated)).shape == (30, 20, 3)


def fake_decoding(sizes: dict[str, int]) -> tuple[object, list[tuple[str, ...]]]:
    """A read that takes a little time and returns an array of the file's size in bytes; what it records:
    the files being decoded at each start."""
    running: set[str] = set()
    seen: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def read(path: Path) -> np.ndarray:
        with lock:
            running.add(path.name)
            seen.append(tuple(sorted(running)))
        time.sleep(0.01)
        with lock:
            running.discard(path.name)
        return np.zeros(sizes[path.name], np.uint8)

    return read, seen


def test_images_held_ahead_stay_within_the_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """One image at a time (--batch-size 1, full-size images): the bytes decoding or decoded and not yet
    handed back stay within the budget, though the count alone would allow many more; a file bigger than
    the budget is decoded alone; every image comes back, in order."""
    monkeypatch.setattr(prediction, "usable_cores", lambda: 4)
    sizes = {f"{index:02d}": 1000 if index == 7 else 100 for index in range(30)}
    read, seen = fake_decoding(sizes)
    files = [Path(name) for name in sizes]
    cost = lambda path: sizes[path.name]  # noqa: E731
    held: set[str] = set()  # from the start of its decoding until the consumer gets it
    most = [0]
    lock = threading.Lock()

    def tracked(path: Path) -> np.ndarray:
        with lock:
            held.add(path.name)
            if len(held) > 1:
                most[0] = max(most[0], sum(sizes[name] for name in held))
        return read(path)

    chunks = ([path] for path in files)
    out = []
    for chunk, images in prediction.decoded_ahead(tracked, chunks, ahead=20, cost=cost, budget=350):
        assert [image.nbytes for image in images] == [sizes[path.name] for path in chunk]
        out += chunk
        with lock:
            held.difference_update(path.name for path in chunk)
    assert out == files
    assert 0 < most[0] <= 350
    assert all(names == ("07",) for names in seen if "07" in names)
    assert max(len(names) for names in seen) > 1  # small ones still decode side by side


def test_a_chunk_is_completed_over_the_budget_one_image_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched, a chunk's images are classified together, so a chunk whose images do not fit is decoded one
    after another, each counted at its decoded size once done."""
    monkeypatch.setattr(prediction, "usable_cores", lambda: 2)
    sizes = {f"{index:02d}": 300 for index in range(8)}
    read, seen = fake_decoding(sizes)
    chunks = [[Path(f"{index:02d}") for index in range(start, start + 4)] for start in (0, 4)]
    out = list(prediction.decoded_ahead(read, chunks, ahead=4, cost=lambda path: 400, budget=500))
    assert [[path.name for path in chunk] for chunk, _ in out] == [[p.name for p in c] for c in chunks]
    assert max(len(names) for names in seen) == 1  # two of 400 never fit in 500


def test_one_at_a_time_a_huge_image_is_resized_first_and_gives_the_same_probabilities(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-size 1 gives the model each image at its own size, unless its float32 copy would exceed the
    decode budget: then it is resized first, by the model's own kernel, so the probabilities stay the same."""
    import keras

    small, large = write_png(tmp_path / "small.png", 12), write_png(tmp_path / "large.png", 300)
    monkeypatch.setattr(prediction, "DECODE_BUDGET", 300 * 300 * prediction.FLOAT_BYTES_PER_PIXEL - 1)
    assert prediction.read_own_size(small, (8, 8)).shape == (12, 12, 3)
    assert prediction.read_own_size(large, (8, 8)).shape == (8, 8, 3)
    assert prediction.read_own_size(large, None).shape == (300, 300, 3)  # no known size: as it is
    model = keras.models.load_model(model_path)
    classifier = prediction.keras_classifier(model, CLASSES)
    got = [p.probabilities for p in prediction.predict_files(classifier, [small, large], batch_size=1)]
    expected = [model.predict(prediction.read_pixels(path)[np.newaxis], verbose=0)[0] for path in (small, large)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
