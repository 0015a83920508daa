"""Small synthetic image datasets with visually separable classes, for fast end-to-end tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Each class has its own dominant colour and pattern, so even a randomly initialised backbone separates them.
CLASS_COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 200, 30)]


def synthetic_image(class_index: int, rng: np.random.Generator, size: int = 40, mode: str = "RGB") -> Image.Image:
    base = np.array(CLASS_COLOURS[class_index % len(CLASS_COLOURS)], dtype=np.float32)
    pixels = base + rng.normal(0, 25, (size, size, 3))
    if class_index % 2:
        pixels[:, ::4] *= 0.5  # stripes
    else:
        y, x = np.ogrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        pixels[(y - cy) ** 2 + (x - cx) ** 2 < (size // 5) ** 2] = 255  # a bright disc
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image.convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_dataset_zip(
    path: Path,
    classes: tuple[str, ...] = ("cats", "dogs"),
    n_train: int | tuple[int, ...] = 20,
    n_test: int | tuple[int, ...] = 10,
    size: int = 40,
    seed: int = 0,
    root: str = "synthetic",
    grayscale: tuple[str, ...] = (),
) -> Path:
    """A zip laid out like cats_and_dogs_filtered: <root>/{train,validation}/<class>/<class>.<n>.jpg."""
    rng = np.random.default_rng(seed)
    per_class = lambda n, i: n[i] if isinstance(n, tuple) else n  # noqa: E731
    with zipfile.ZipFile(path, "w") as archive:
        for split, counts in (("train", n_train), ("validation", n_test)):
            for index, name in enumerate(classes):
                mode = "L" if name in grayscale else "RGB"
                for n in range(per_class(counts, index)):
                    image = synthetic_image(index, rng, size, mode)
                    archive.writestr(f"{root}/{split}/{name}/{name}.{split}.{n}.jpg", encode(image))
    return path
