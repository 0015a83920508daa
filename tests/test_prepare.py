"""Tests of the `prepare` stage and the image helpers it shares with `predict`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import PROJECT_ROOT, SHARED_DIR, require_shared
from tlpipe import preparation as prepare_module
from tlpipe.errors import PipelineError
from tlpipe.images import ImageRejected, open_image
from tlpipe.paths import PREPARED_DIR, RAW_ARCHIVE
from tlpipe.preparation import Settings, carve, copy_limited, prepare

REAL_ZIP = SHARED_DIR / "data" / "cats_and_dogs_filtered.zip"
SETTINGS = Settings(seed=42, val_fraction=0.2, test_fraction=0.2, max_extract_bytes=10**9, max_image_pixels=10**7)


# --- building archives ------------------------------------------------------------------------------


def image_bytes(fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (20, 10), seed: int = 0, **save) -> bytes:
    """A small image with varied pixels, so every file differs and JPEGs have real content."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand: Pillow can only write 16-bit grayscale, not 16-bit RGB."""
    height, width = array.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rotated_jpeg(size: tuple[int, int] = (20, 10), orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes("JPEG", size=size, exif=exif.tobytes())


def bad_crc_png() -> bytes:
    """A PNG whose pixel data checksum is wrong: Pillow's load() accepts it, TensorFlow's libpng does not."""
    data = bytearray(image_bytes("PNG"))
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF
    return bytes(data)


def make_zip(path: Path, entries: dict[str, bytes | None], symlinks: dict[str, str] | None = None) -> Path:
    """Write a zip holding `entries` (None = a directory entry) and symlink entries name -> link target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if data is None:
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
                zf.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, data, zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def class_images(prefix: str, counts: dict[str, int], seed: int = 0) -> dict[str, bytes | None]:
    """`counts[label]` distinct JPEGs under `prefix/label/` (or `label/` when prefix is empty)."""
    return {
        f"{prefix}/{label}/{label}.{i}.jpg".lstrip("/"): image_bytes(seed=seed * 10_000 + number * 100 + i)
        for number, (label, count) in enumerate(counts.items())
        for i in range(count)
    }


def two_level(train: dict[str, int], test: dict[str, int], top: str = "dataset") -> dict[str, bytes | None]:
    return {**class_images(f"{top}/train", train), **class_images(f"{top}/validation", test, seed=1)}


def run_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, bytes | None], **settings):
    """Run the stage function from `tmp_path` as the project root; return (report, manifest rows)."""
    monkeypatch.chdir(tmp_path)
    make_zip(tmp_path / RAW_ARCHIVE, entries)
    report = prepare(RAW_ARCHIVE, PREPARED_DIR, dataclasses.replace(SETTINGS, **settings))
    return report, read_manifest(tmp_path)


def read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / PREPARED_DIR / "manifest.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def counts(rows: list[dict[str, str]]) -> dict[tuple[str, str], int]:
    result: dict[tuple[str, str], int] = {}
    for row in rows:
        result[row["split"], row["label"]] = result.get((row["split"], row["label"]), 0) + 1
    return result


def leftovers(root: Path) -> list[str]:
    data = root / "data"
    return sorted(p.name for p in data.iterdir() if p.name not in ("raw", "prepared")) if data.is_dir() else []


# --- layouts and splitting ----------------------------------------------------------------------------


def test_two_level_layout_counts_paths_and_outputs(tmp_path, monkeypatch):
    report, rows = run_prepare(tmp_path, monkeypatch, two_level({"cats": 10, "dogs": 6}, {"cats": 4, "dogs": 3}))

    # val = round(0.2 * n) per class, taken out of train/; validation/ becomes the test split.
    assert counts(rows) == {
        ("train", "cats"): 8,
        ("val", "cats"): 2,
        ("test", "cats"): 4,
        ("train", "dogs"): 5,
        ("val", "dogs"): 1,
        ("test", "dogs"): 3,
    }
    assert list(rows[0]) == ["path", "label", "split", "sha256"]
    for row in rows:
        assert (tmp_path / row["path"]).is_file()
        assert row["sha256"] == hashlib.sha256((tmp_path / row["path"]).read_bytes()).hexdigest()
        folder = "validation" if row["split"] == "test" else "train"
        assert row["path"].startswith(f"data/prepared/images/dataset/{folder}/{row['label']}/")
    order = ["train", "val", "test"]
    assert rows == sorted(rows, key=lambda row: (order.index(row["split"]), row["path"]))
    assert json.loads((tmp_path / "data/prepared/classes.json").read_text()) == ["cats", "dogs"]
    saved = json.loads((tmp_path / "data/prepared/report.json").read_text())
    assert saved == report
    assert saved["classes"] == ["cats", "dogs"]
    assert saved["counts"] == {
        "train": {"cats": 8, "dogs": 5},
        "val": {"cats": 2, "dogs": 1},
        "test": {"cats": 4, "dogs": 3},
    }
    assert saved["skipped"] == [] and saved["converted"] == [] and saved["ignored"] == 0
    assert leftovers(tmp_path) == []


def test_split_is_seeded_and_reruns_replace_the_output(tmp_path, monkeypatch):
    entries = two_level({"cats": 10, "dogs": 10}, {"cats": 2, "dogs": 2})
    run_prepare(tmp_path, monkeypatch, entries)
    first = (tmp_path / "data/prepared/manifest.csv").read_bytes()
    (tmp_path / "data/prepared/stray.txt").write_text("from an older run")
    (tmp_path / "data/.prepared.tmp-killed").mkdir()  # what a killed run leaves behind

    run_prepare(tmp_path, monkeypatch, entries)
    assert (tmp_path / "data/prepared/manifest.csv").read_bytes() == first
    assert not (tmp_path / "data/prepared/stray.txt").exists()
    assert leftovers(tmp_path) == []

    _, other = run_prepare(tmp_path, monkeypatch, entries, seed=7)
    assert {r["path"] for r in other if r["split"] == "val"} != {
        r["path"] for r in read_manifest_bytes(first) if r["split"] == "val"
    }


def read_manifest_bytes(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_a_failed_run_keeps_the_previous_output(tmp_path, monkeypatch):
    run_prepare(tmp_path, monkeypatch, two_level({"cats": 3, "dogs": 3}, {"cats": 1, "dogs": 1}))
    before = (tmp_path / "data/prepared/manifest.csv").read_bytes()
    with pytest.raises(PipelineError):
        run_prepare(tmp_path, monkeypatch, two_level({"cats": 3}, {"cats": 1}))
    assert (tmp_path / "data/prepared/manifest.csv").read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (0, 0.2, 0),
        (1, 0.2, 0),
        (1, 0.9, 0),
        (2, 0.2, 1),
        (2, 0.9, 1),
        (3, 0.2, 1),
        (10, 0.2, 2),
        (11, 0.2, 2),
        (10, 0.9, 9),
    ],
)
def test_carve_sizes(n, fraction, expected):
    files = [Path(f"f{i:02d}") for i in range(n)]
    taken, rest = carve(files, fraction, np.random.default_rng(0))
    assert len(taken) == expected
    assert sorted(taken + rest) == files and not set(taken) & set(rest)
    assert rest == sorted(rest) and taken == sorted(taken)  # input order kept, so the manifest is stable


@pytest.mark.parametrize("top", ["", "flowers/"])
def test_class_tree_layout_uses_test_fraction(tmp_path, monkeypatch, top):
    entries = class_images(top.rstrip("/"), {"roses": 10, "tulips": 5})
    report, rows = run_prepare(tmp_path, monkeypatch, entries, test_fraction=0.3, val_fraction=0.25)

    # roses: test round(3.0)=3, val round(0.25*7)=2; tulips: test round(1.5)=2, val round(0.75)=1.
    assert counts(rows) == {
        ("train", "roses"): 5,
        ("val", "roses"): 2,
        ("test", "roses"): 3,
        ("train", "tulips"): 2,
        ("val", "tulips"): 1,
        ("test", "tulips"): 2,
    }
    assert report["layout"] == "class folders"
    assert report["dataset_root"] == (top.rstrip("/") or ".")
    assert all((tmp_path / row["path"]).is_file() for row in rows)
    _, again = run_prepare(tmp_path, monkeypatch, entries, test_fraction=0.3, val_fraction=0.25)
    assert again == rows


def test_dataset_root_is_found_below_other_folders(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}, top="a/b")
    entries["a/README.txt"] = b"about the data"
    entries["a/b/train/notes.txt"] = b"not in a class folder"
    report, rows = run_prepare(tmp_path, monkeypatch, entries)
    assert report["dataset_root"] == "a/b" and len(rows) == 6
    assert report["skipped"] == [
        {"path": "data/prepared/images/a/README.txt", "reason": "not in a class folder"},
        {"path": "data/prepared/images/a/b/train/notes.txt", "reason": "not in a class folder"},
    ]


def test_single_class_is_an_error_naming_the_folder(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match=r"dataset/train/ .*two class folders, found only 'cats'"):
        run_prepare(tmp_path, monkeypatch, two_level({"cats": 3}, {"cats": 1}))
    with pytest.raises(PipelineError, match=r"\(top level\).*found only 'cats'"):
        run_prepare(tmp_path, monkeypatch, class_images("", {"cats": 3}))
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


def test_different_classes_in_validation_is_an_error_naming_both(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "birds": 1})
    with pytest.raises(PipelineError, match=r"dataset/train/ .*'cats', 'dogs'.*dataset/validation/ .*'birds', 'cats'"):
        run_prepare(tmp_path, monkeypatch, entries)


def test_class_left_without_usable_images_is_an_error_naming_it(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1})
    entries["dataset/validation/dogs/dog.jpg"] = b"this is text"
    with pytest.raises(PipelineError, match=r"dataset/validation/dogs/ .*no usable images.*not an image"):
        run_prepare(tmp_path, monkeypatch, entries)

    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1}) | {"dataset/validation/dogs/": None}
    with pytest.raises(PipelineError, match=r"dataset/validation/dogs/ .*has no files"):
        run_prepare(tmp_path, monkeypatch, entries)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            two_level({"cats": 1, "dogs": 3}, {"cats": 1, "dogs": 1}),
            r"folder dataset/train/cats/ in data/raw/dataset\.zip \(class 'cats'\) has 1 usable image; "
            r"the class needs at least 2 there \(1 for validation, 1 for training\): add images",
            id="train/validation: val carved from train",
        ),
        pytest.param(
            two_level({"cats": 1, "dogs": 3}, {"cats": 1, "dogs": 1}) | {"dataset/train/cats/x.jpg": b"text"},
            r"dataset/train/cats/ .*\(class 'cats'\) has 1 usable image \(1 more skipped, e\.g\. x\.jpg: not an "
            r"image\); the class needs at least 2",
            id="train/validation: skipped files do not count",
        ),
        pytest.param(
            class_images("", {"roses": 5, "tulips": 2}),
            r"folder tulips/ in data/raw/dataset\.zip \(class 'tulips'\) has 2 usable images; the class needs "
            r"at least 3 there \(1 each for the test, validation and training splits\)",
            id="class folders: test and val carved",
        ),
    ],
)
def test_class_too_small_for_every_split_is_one_line_naming_it(tmp_path, monkeypatch, entries, expected):
    with pytest.raises(PipelineError, match=expected) as error:
        run_prepare(tmp_path, monkeypatch, entries)
    assert "\n" not in str(error.value)
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("entries", "settings"),
    [
        pytest.param(two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}), {}, id="train/validation"),
        pytest.param(
            two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}),
            {"val_fraction": 0.9},
            id="train/validation, large val_fraction",
        ),
        pytest.param(class_images("", {"roses": 3, "tulips": 3}), {}, id="class folders"),
        # Carving the test split first must leave one image for validation, however large test_fraction is.
        pytest.param(
            class_images("", {"roses": 3, "tulips": 3}),
            {"test_fraction": 0.9, "val_fraction": 0.9},
            id="class folders, large fractions",
        ),
    ],
)
def test_class_exactly_at_the_needed_count_reaches_every_split(tmp_path, monkeypatch, entries, settings):
    report, rows = run_prepare(tmp_path, monkeypatch, entries, **settings)
    assert {split: set(labels.values()) for split, labels in report["counts"].items()} == {
        "train": {1},
        "val": {1},
        "test": {1},
    }
    assert len(rows) == 6


def test_class_under_the_minimum_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    minimum = prepare_module.MIN_TRAIN_IMAGES
    # val_fraction 0.5 takes half of train/<class>: cats keep exactly the minimum, dogs one image less.
    entries = two_level({"cats": 2 * minimum, "dogs": 2 * (minimum - 1)}, {"cats": 1, "dogs": 1})
    capsys.readouterr()
    report, _ = run_prepare(tmp_path, monkeypatch, entries, val_fraction=0.5)

    assert report["counts"]["train"] == {"cats": minimum, "dogs": minimum - 1}
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: {report['warnings'][0]['message']}"]
    assert lines[0].startswith(f"warning: class 'dogs' has {minimum - 1} training images")
    assert "dataset/train/dogs/ in data/raw/dataset.zip" in lines[0] and f"minimum of {minimum}" in lines[0]
    assert [{k: v for k, v in w.items() if k != "message"} for w in report["warnings"]] == [
        {"class": "dogs", "train_images": minimum - 1, "minimum": minimum}
    ]
    assert json.loads((tmp_path / "data/prepared/report.json").read_text())["warnings"] == report["warnings"]

    run_prepare(
        tmp_path,
        monkeypatch,
        two_level({"cats": 2 * minimum, "dogs": 2 * minimum}, {"cats": 1, "dogs": 1}),
        val_fraction=0.5,
    )
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "data/prepared/report.json").read_text())["warnings"] == []


def test_classes_too_small_to_keep_are_left_out_listed_and_named_in_one_line(tmp_path, monkeypatch, capsys):
    """data.min_class_images: a class under it, or one that cannot reach every split, is left out, with its
    reason in the report and one line for all of them; its images are not part of the prepared data."""
    entries = class_images("", {"roses": 6, "tulips": 2, "daisies": 4, "irises": 5}) | {"tulips/x.jpg": b"text"}
    capsys.readouterr()
    report, rows = run_prepare(tmp_path, monkeypatch, entries, min_class_images=5)

    assert report["classes"] == ["irises", "roses"]
    assert {row["label"] for row in rows} == {"irises", "roses"}
    assert json.loads((tmp_path / "data/prepared/classes.json").read_text()) == ["irises", "roses"]
    assert sorted(p.name for p in (tmp_path / "data/prepared/images").iterdir()) == ["irises", "roses"]
    assert report["left_out"] == [
        {
            "class": "daisies",
            "usable_images": 4,
            "reason": "class 'daisies' has 4 usable images, fewer than data.min_class_images (5)",
        },
        {
            "class": "tulips",
            "usable_images": 2,
            "reason": "class 'tulips' has 2 usable images, fewer than data.min_class_images (5)",
        },
    ]
    assert report["skipped"] == []  # the skipped file was in a class left out
    assert json.loads((tmp_path / "data/prepared/report.json").read_text())["left_out"] == report["left_out"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare:")]
    assert lines == [
        "prepare: left out 2 of 4 classes too small to reach every split or under data.min_class_images (usable "
        "images): 'daisies' (4), 'tulips' (2); each with its reason in data/prepared/report.json `left_out`"
    ]


def test_a_class_that_cannot_reach_every_split_is_left_out_with_the_folder_that_lacks_images(tmp_path, monkeypatch):
    entries = two_level({"cats": 4, "dogs": 4, "foxes": 6}, {"cats": 2, "dogs": 2}) | {
        "dataset/validation/foxes/notes.txt": b"text"
    }
    report, rows = run_prepare(tmp_path, monkeypatch, entries, min_class_images=3)
    assert report["classes"] == ["cats", "dogs"] and {row["label"] for row in rows} == {"cats", "dogs"}
    assert [item["class"] for item in report["left_out"]] == ["foxes"]
    assert report["left_out"][0]["reason"].startswith(
        "folder dataset/validation/foxes/ in data/raw/dataset.zip (class 'foxes') has no usable images: all 1 "
        "files were skipped (e.g. notes.txt: not an image); the class needs at least 1 there (1 for the test split)"
    )
    assert not (tmp_path / "data/prepared/images/dataset/train/foxes").exists()


def test_too_few_classes_left_is_one_line(tmp_path, monkeypatch):
    entries = class_images("", {"roses": 6, "tulips": 2, "daisies": 1})
    with pytest.raises(PipelineError, match=r"^2 of 3 classes are too small to keep and only 'roses' is left") as error:
        run_prepare(tmp_path, monkeypatch, entries, min_class_images=3)
    assert "\n" not in str(error.value) and "lower data.min_class_images" in str(error.value)
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


def test_many_small_classes_are_one_warning_line_and_each_is_in_the_report(tmp_path, monkeypatch, capsys):
    minimum = prepare_module.MIN_TRAIN_IMAGES
    sizes = {f"c{i}": 3 + i for i in range(8)}  # every class under the minimum of training images
    capsys.readouterr()
    report, _ = run_prepare(tmp_path, monkeypatch, class_images("", sizes), min_class_images=3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: 8 classes have fewer than {minimum} training images")
    assert lines[0].count("'c") == prepare_module.SHOWN_CLASSES and "and 3 more" in lines[0]
    assert "'c0' (1)" in lines[0]  # the smallest first
    assert sorted(w["class"] for w in report["warnings"]) == sorted(sizes)


# --- safe unpacking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.txt", "/abs.txt", "a/../../evil.txt", "..\\evil.txt", "C:/evil.txt"])
def test_entries_escaping_the_target_are_refused(tmp_path, monkeypatch, name):
    project = tmp_path / "deep" / "project"  # so that ../ lands inside tmp_path, where the test can look
    project.mkdir(parents=True)
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {name: b"owned"}
    with pytest.raises(PipelineError, match=r"entry '.*(evil|abs)\.txt'"):
        run_prepare(project, monkeypatch, entries)
    assert not (project / PREPARED_DIR).exists()
    assert leftovers(project) == []
    written = [p for p in tmp_path.rglob("*") if p.name in ("evil.txt", "abs.txt")]
    assert written == [] and not Path("/abs.txt").exists()


def test_symlink_entries_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_zip(
        tmp_path / RAW_ARCHIVE,
        two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}),
        symlinks={"dataset/train/cats/link.jpg": "/etc/passwd"},
    )
    with pytest.raises(PipelineError, match=r"entry 'dataset/train/cats/link.jpg' is a symbolic link"):
        prepare(RAW_ARCHIVE, PREPARED_DIR, SETTINGS)
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


def test_declared_size_over_the_limit_is_refused(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {"dataset/zeros.bin": bytes(2_000_000)}
    with pytest.raises(PipelineError, match=r"would unpack to [\d,]+ bytes, more than data.max_extract_bytes"):
        run_prepare(tmp_path, monkeypatch, entries, max_extract_bytes=1_000_000)
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


def lying_zip(path: Path, real_size: int, declared: int) -> Path:
    """A zip whose one entry unpacks to `real_size` bytes while both headers declare `declared`."""
    make_zip(path, {"dataset/bomb.bin": bytes(real_size)})
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))
    return path


def test_lying_header_is_refused_without_writing_past_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lying_zip(tmp_path / RAW_ARCHIVE, real_size=5_000_000, declared=100)
    with pytest.raises(PipelineError, match=r"dataset/bomb\.bin"):
        prepare(RAW_ARCHIVE, PREPARED_DIR, dataclasses.replace(SETTINGS, max_extract_bytes=1000))
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []


def test_streaming_counter_stops_an_entry_larger_than_the_budget(tmp_path, monkeypatch):
    # zipfile itself stops at the declared size, so switch off the declared-size check to reach the counter.
    monkeypatch.setattr(prepare_module, "check_declared_size", lambda *args: None)
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {"dataset/zeros.bin": bytes(3_000_000)}
    with pytest.raises(PipelineError, match=r"entry 'dataset/zeros\.bin' unpacks to more bytes.*zip bomb"):
        run_prepare(tmp_path, monkeypatch, entries, max_extract_bytes=1_000_000)
    assert leftovers(tmp_path) == []


def test_copy_limited_stops_one_byte_past_the_budget():
    source, target = io.BytesIO(b"x" * 10_000), io.BytesIO()
    assert copy_limited(source, target, 100) == 101
    assert len(target.getvalue()) == 101
    target = io.BytesIO()
    assert copy_limited(io.BytesIO(b"y" * 100), target, 100) == 100 and target.getvalue() == b"y" * 100


@pytest.mark.parametrize("damage", ["not a zip", "truncated", "missing"])
def test_unreadable_archive_gives_a_clear_error(tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    archive = make_zip(tmp_path / RAW_ARCHIVE, two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}))
    if damage == "not a zip":
        archive.write_text("<html>404 Not Found</html>")
    elif damage == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    else:
        archive.unlink()
    with pytest.raises(PipelineError) as error:
        prepare(RAW_ARCHIVE, PREPARED_DIR, SETTINGS)
    message = str(error.value)
    assert "data/raw/dataset.zip" in message and "\n" not in message
    assert ("dvc repro fetch" if damage == "missing" else "delete it and rerun `dvc repro -f fetch`") in message


def test_hidden_files_and_macosx_are_ignored(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {
        ".DS_Store": b"\0\0\0\1Bud1",
        "dataset/train/cats/.DS_Store": b"\0\0\0\1Bud1",
        "dataset/train/cats/._cats.0.jpg": b"\0\5\26\7AppleDouble",
        "dataset/.git/": None,
        "dataset/.git/config": b"[core]",
        "__MACOSX/": None,
        "__MACOSX/dataset/train/cats/._cats.0.jpg": b"\0\5\26\7AppleDouble",
    }
    report, rows = run_prepare(tmp_path, monkeypatch, entries)
    assert report["ignored"] == 5 and report["skipped"] == [] and len(rows) == 6
    images = tmp_path / "data/prepared/images"
    assert sorted(p.name for p in images.iterdir()) == ["dataset"]
    assert not [p for p in images.rglob(".*")]


def files_left(root: Path) -> set[str]:
    """Every file under data/prepared/images, as the manifest spells paths."""
    images = root / PREPARED_DIR / "images"
    return {path.relative_to(root).as_posix() for path in images.rglob("*") if path.is_file()}


def test_only_the_manifest_images_are_kept_and_every_other_file_is_listed_with_its_reason(tmp_path, monkeypatch):
    # A 2 MB text file named like an image compresses to a few kilobytes: the shape of a 1 GB one, cheaply.
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {
        "dataset/train/cats/huge.jpg": bytes(2_000_000),
        "dataset/train/dogs/notes.txt": b"just some words\n",
        "dataset/validation/cats/big.png": image_bytes("PNG", size=(100, 100)),
        "dataset/README.md": b"# the dataset\n",
        "LICENSE": b"CC-BY\n",
    }
    report, rows = run_prepare(tmp_path, monkeypatch, entries, max_image_pixels=5000)
    assert files_left(tmp_path) == {row["path"] for row in rows} and len(rows) == 6
    skipped = {item["path"].removeprefix("data/prepared/images/"): item["reason"] for item in report["skipped"]}
    assert skipped == {
        "dataset/train/cats/huge.jpg": "not an image",
        "dataset/train/dogs/notes.txt": "not an image",
        "dataset/validation/cats/big.png": skipped["dataset/validation/cats/big.png"],
        "dataset/README.md": "not in a class folder",
        "LICENSE": "not in a class folder",
    }
    assert skipped["dataset/validation/cats/big.png"].startswith("too many pixels")
    kept_bytes = sum(path.stat().st_size for path in (tmp_path / PREPARED_DIR).rglob("*") if path.is_file())
    assert kept_bytes < 100_000


def test_a_file_that_cannot_be_converted_is_not_kept(tmp_path, monkeypatch):
    def refuse(image):
        raise ValueError("no such colour space")

    monkeypatch.setattr(prepare_module, "to_rgb", refuse)
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | {
        "dataset/train/cats/g.png": image_bytes("PNG", "L")
    }
    report, rows = run_prepare(tmp_path, monkeypatch, entries)
    assert files_left(tmp_path) == {row["path"] for row in rows}
    assert [item["reason"] for item in report["skipped"]] == ["cannot convert to RGB (no such colour space)"]


def entry_names(count: int) -> dict[str, bytes | None]:
    return {f"dataset/extra/{i}.txt": b"" for i in range(count)}


def test_an_archive_with_too_many_entries_is_refused_before_its_directory_is_read(tmp_path, monkeypatch):
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1}) | entry_names(20)
    total = len(entries)
    monkeypatch.chdir(tmp_path)
    make_zip(tmp_path / RAW_ARCHIVE, entries)
    settings = dataclasses.replace(SETTINGS, max_archive_entries=total - 1)

    def never(*args, **kwargs):
        raise AssertionError("the central directory was read")

    with monkeypatch.context() as patched:
        patched.setattr(prepare_module.zipfile, "ZipFile", never)
        with pytest.raises(PipelineError) as error:
            prepare(RAW_ARCHIVE, PREPARED_DIR, settings)
    assert str(error.value) == (
        f"data/raw/dataset.zip has {total} entries, more than data.max_archive_entries ({total - 1}); refusing it "
        "before unpacking (raise the limit if you trust the archive)"
    )
    assert not (tmp_path / PREPARED_DIR).exists() and leftovers(tmp_path) == []
    report = prepare(RAW_ARCHIVE, PREPARED_DIR, dataclasses.replace(settings, max_archive_entries=total))
    assert report["total"] == 6  # the limit itself passes


def test_an_end_record_that_understates_the_entries_is_caught_on_the_entries_read(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "declared_entry_count", lambda archive: 1)
    entries = two_level({"cats": 2, "dogs": 2}, {"cats": 1, "dogs": 1})
    with pytest.raises(PipelineError, match=r"has 6 entries, more than data\.max_archive_entries \(5\)"):
        run_prepare(tmp_path, monkeypatch, entries, max_archive_entries=5)
    assert not (tmp_path / PREPARED_DIR).exists()


def test_the_zip64_end_record_count_is_read(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(70_000):  # over 65,535: only the zip64 end record holds the count
            zf.writestr(f"{i}", b"")
    assert prepare_module.declared_entry_count(archive) == 70_000


@pytest.mark.parametrize("name", ["...", "....", "…"])
def test_a_class_folder_named_with_dots_only_is_a_class(tmp_path, monkeypatch, name):
    entries = {
        f"{folder}/{i}.jpg": image_bytes(seed=10 * n + i) for n, folder in enumerate([name, "cats"]) for i in range(3)
    }
    entries |= {".hidden/x.jpg": image_bytes(), "cats/.x.jpg": b"x"}
    report, rows = run_prepare(tmp_path, monkeypatch, entries)
    assert report["classes"] == sorted([name, "cats"]) and report["ignored"] == 2
    assert {row["label"] for row in rows} == {name, "cats"}


@pytest.mark.parametrize(
    ("name", "hidden"),
    [(".DS_Store", True), ("._a.jpg", True), (".git", True), (". ", True), ("...", False), ("a.", False)],
)
def test_hidden_means_a_dot_then_a_name(name, hidden):
    assert prepare_module.is_hidden(name) is hidden


def inner_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("cats/cat.jpg", image_bytes())
    return buffer.getvalue()


def test_an_archive_holding_only_an_archive_names_it_and_says_to_unpack_it(tmp_path, monkeypatch):
    with pytest.raises(PipelineError) as error:
        run_prepare(tmp_path, monkeypatch, {"pets.zip": inner_zip(), "readme.txt": b"hi"})
    message = str(error.value)
    assert "needs at least two class folders, found none" in message
    assert "holds an archive inside it ('pets.zip'), which prepare does not unpack: unpack it" in message
    assert "\n" not in message and not (tmp_path / PREPARED_DIR).exists()


def test_class_folders_of_archives_name_the_first_few(tmp_path, monkeypatch):
    names = ["cats/a.zip", "cats/b.tar.gz", "dogs/c.7z", "dogs/d.RAR"]
    with pytest.raises(PipelineError) as error:
        run_prepare(tmp_path, monkeypatch, {name: inner_zip() for name in names}, min_class_images=1)
    message = str(error.value)
    assert "class 'cats' has 0 usable images" in message
    assert "holds 4 archives inside it ('cats/a.zip', 'cats/b.tar.gz', 'dogs/c.7z' and 1 more)" in message
    assert message.endswith("unpack them and zip the folders of images instead")


def test_an_error_without_inner_archives_says_nothing_of_them(tmp_path, monkeypatch):
    with pytest.raises(PipelineError) as error:
        run_prepare(tmp_path, monkeypatch, {"cats/a.jpg": b"text", "dogs/b.jpg": b"text"}, min_class_images=1)
    assert "archive inside" not in str(error.value) and "archives inside" not in str(error.value)


def test_odd_class_names_stay_on_one_line_and_round_trip_through_the_manifest(tmp_path, monkeypatch, capsys):
    odd = ["ca\nts", "a|b", 'd,o"g']
    # Only the first class is small: its warning is the one that names its folder.
    entries = two_level({"ca\nts": 2, "a|b": 13, 'd,o"g': 13}, {name: 1 for name in odd})
    report, rows = run_prepare(tmp_path, monkeypatch, entries)
    assert report["classes"] == sorted(odd) and {row["label"] for row in rows} == set(odd)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1, warning  # one line, the newline shown as \n
    assert "class 'ca\\nts' has 1 training image after the split (from folder dataset/train/ca\\nts/ in" in warning
    assert json.loads((tmp_path / "data/prepared/classes.json").read_text()) == sorted(odd)


def test_a_newline_in_a_folder_name_stays_escaped_in_an_error(tmp_path, monkeypatch):
    entries = class_images("", {"ca\nts": 2, "dogs": 3})
    with pytest.raises(PipelineError) as error:
        run_prepare(tmp_path, monkeypatch, entries)
    message = str(error.value)
    assert "\n" not in message and "folder ca\\nts/ in data/raw/dataset.zip (class 'ca\\nts')" in message


# --- image checks and conversions -------------------------------------------------------------------------

GOOD_JPEG = image_bytes(size=(60, 40), seed=5, quality=95)
ODD_FILES: dict[str, tuple[str, bytes]] = {
    # name: (expected outcome, bytes); outcome is kept, converted or a word of the skip reason
    "good.jpg": ("kept", GOOD_JPEG),
    "png_named.jpg": ("kept", image_bytes("PNG")),
    "tiny.png": ("kept", image_bytes("PNG", size=(1, 1))),
    "empty.jpg": ("empty", b""),
    "cut.jpg": ("truncated", GOOD_JPEG[: len(GOOD_JPEG) // 2]),
    "text.jpg": ("not an image", b"just some words\n"),
    "bad_crc.png": ("does not decode", bad_crc_png()),
    "notes.txt": ("not an image", b"just some words\n"),
    "anim.gif": ("converted", image_bytes("GIF", "P")),
    "bitmap.bmp": ("converted", image_bytes("BMP")),
    "photo.webp": ("converted", image_bytes("WEBP")),
    "gray.jpg": ("converted", image_bytes("JPEG", "L")),
    "gray_alpha.png": ("converted", image_bytes("PNG", "LA")),
    "palette.png": ("converted", image_bytes("PNG", "P")),
    "tiny_gray.png": ("converted", image_bytes("PNG", "L", size=(1, 1))),
    "gray16.png": ("converted", png16(np.full((10, 20), 40000), color_type=0)),
    "rgb16.png": ("converted", png16(np.full((10, 20, 3), 40000), color_type=2)),
    "cmyk.jpg": ("converted", image_bytes("JPEG", "CMYK")),
    "alpha.png": ("converted", image_bytes("PNG", "RGBA")),
    "rotated.jpg": ("converted", rotated_jpeg((20, 10), orientation=6)),
    "bomb.png": ("too many pixels", image_bytes("PNG", size=(80, 50))),  # 4000 > 3000: Pillow only warns
    "big_bomb.png": ("too many pixels", image_bytes("PNG", size=(100, 100))),  # over 2x: Pillow raises
}


@pytest.fixture
def odd_run(tmp_path, monkeypatch):
    entries = two_level({"cats": 1, "dogs": 2}, {"cats": 1, "dogs": 1})
    entries |= {f"dataset/train/cats/{name}": data for name, (_, data) in ODD_FILES.items()}
    report, rows = run_prepare(tmp_path, monkeypatch, entries, max_image_pixels=3000)
    return tmp_path, report, rows


def test_every_odd_file_is_kept_converted_or_skipped_with_its_reason(odd_run):
    root, report, rows = odd_run
    prefix = "data/prepared/images/dataset/train/cats/"
    in_manifest = {row["path"] for row in rows}
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    converted = {item["path"]: item for item in report["converted"]}
    for name, (outcome, _) in ODD_FILES.items():
        original = prefix + name
        if outcome == "kept":
            assert original in in_manifest, name
            assert (root / original).read_bytes() == ODD_FILES[name][1], name  # untouched
        elif outcome == "converted":
            png = original + ".png"
            assert png in in_manifest and original not in in_manifest, name
            assert not (root / original).exists(), name
            assert converted[png]["original"] == original and converted[png]["from"], name
        else:
            assert outcome in skipped[original], (name, skipped.get(original))
            assert original not in in_manifest and not (root / original).exists(), name
    assert len(skipped) == sum(o not in ("kept", "converted") for o, _ in ODD_FILES.values())
    assert len(converted) == sum(o == "converted" for o, _ in ODD_FILES.values())


def test_every_manifest_image_is_an_upright_8_bit_rgb_jpeg_or_png(odd_run):
    root, _, rows = odd_run
    for row in rows:
        with Image.open(root / row["path"]) as image:
            assert image.format in ("JPEG", "PNG"), row
            assert image.mode == "RGB", row
            assert image.tile[0].args in ("RGB", ("RGB", "")), row  # 8 bits per channel
            assert image.getexif().get(0x0112, 1) == 1, row


def test_conversions_keep_the_picture(odd_run):
    root, report, _ = odd_run
    folder = root / "data/prepared/images/dataset/train/cats"

    def pixels(name: str) -> np.ndarray:
        with Image.open(folder / name) as image:
            return np.asarray(image)

    assert pixels("rotated.jpg.png").shape == (20, 10, 3)  # the 20x10 picture stood up: width and height swap
    assert (pixels("gray16.png.png") == 156).all()  # 40000 / 257, not clipped to 255
    assert (pixels("rgb16.png.png") == 156).all()
    with Image.open(io.BytesIO(ODD_FILES["alpha.png"][1])) as source:
        alpha = np.asarray(source)[..., 3]
    assert (pixels("alpha.png.png")[alpha == 0] == 255).all()  # transparent parts composited on white
    assert pixels("tiny_gray.png.png").shape == (1, 1, 3)
    froms = {item["path"].rsplit("/", 1)[1]: item["from"] for item in report["converted"]}
    assert froms["anim.gif.png"].startswith("GIF") and "orientation 6" in froms["rotated.jpg.png"]
    assert "16-bit" in froms["rgb16.png.png"] and froms["cmyk.jpg.png"].startswith("JPEG CMYK")


def test_read_pixels_for_predict(tmp_path):
    from tlpipe.prediction import read_pixels

    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(image_bytes("JPEG", "CMYK"))
    pixels = read_pixels(cmyk)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == "float32"  # converted to RGB
    text = tmp_path / "photo.jpg"
    text.write_text("hello")
    with pytest.raises(ImageRejected, match=r"photo\.jpg: not an image") as error:
        open_image(text)
    assert isinstance(error.value, PipelineError)  # so predict prints it as one line


# --- the command line --------------------------------------------------------------------------------


def run_stage(project: Path, entries: dict[str, bytes | None] | None = None, raw: bytes | None = None):
    project.mkdir(exist_ok=True)
    shutil.copy(PROJECT_ROOT / "params.yaml", project / "params.yaml")
    archive = project / RAW_ARCHIVE
    if entries is not None:
        make_zip(archive, entries)
    else:
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(raw or b"")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stages.prepare"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_command_line_success_and_errors(tmp_path):
    done = run_stage(tmp_path / "ok", two_level({"cats": 5, "dogs": 5}, {"cats": 2, "dogs": 2}))
    assert done.returncode == 0, done.stderr
    assert "prepared 14 images of 2 classes (train 8, val 2, test 4)" in done.stdout
    rows = read_manifest(tmp_path / "ok")
    assert len(rows) == 14 and all((tmp_path / "ok" / row["path"]).is_file() for row in rows)
    assert (tmp_path / "ok/data/prepared/report.json").is_file()
    assert (tmp_path / "ok/data/prepared/classes.json").is_file()

    for project, kwargs in [
        ("notzip", {"raw": b"<html>not found</html>"}),
        ("oneclass", {"entries": two_level({"cats": 3}, {"cats": 1})}),
        ("tinyclass", {"entries": two_level({"cats": 1, "dogs": 3}, {"cats": 1, "dogs": 1})}),
    ]:
        failed = run_stage(tmp_path / project, **kwargs)
        assert failed.returncode == 1
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr
        assert not (tmp_path / project / PREPARED_DIR).exists()


# --- the real dataset -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_real_cats_and_dogs_archive(tmp_path, monkeypatch):
    require_shared(REAL_ZIP)
    monkeypatch.chdir(tmp_path)
    (tmp_path / RAW_ARCHIVE.parent).mkdir(parents=True)
    os.symlink(REAL_ZIP, tmp_path / RAW_ARCHIVE)
    start = time.perf_counter()
    report = prepare(RAW_ARCHIVE, PREPARED_DIR, dataclasses.replace(SETTINGS, max_image_pixels=89478485))
    elapsed = time.perf_counter() - start
    print(f"prepare on the real archive took {elapsed:.1f} s")

    rows = read_manifest(tmp_path)
    assert counts(rows) == {
        ("train", "cats"): 800,
        ("val", "cats"): 200,
        ("test", "cats"): 500,
        ("train", "dogs"): 800,
        ("val", "dogs"): 200,
        ("test", "dogs"): 500,
    }
    assert report["classes"] == ["cats", "dogs"]
    assert report["skipped"] == [] and report["converted"] == [] and report["ignored"] == 0
    # Every image is unpacked byte for byte.
    expected = dict(
        line.split("  ", 1)[::-1] for line in (REAL_ZIP.with_suffix(".MANIFEST.sha256")).read_text().splitlines()
    )
    prefix = "data/prepared/images/"
    assert len(expected) == 3000
    for row in rows:
        digest = hashlib.sha256((tmp_path / row["path"]).read_bytes()).hexdigest()
        assert digest == expected[row["path"].removeprefix(prefix)], row["path"]
    assert elapsed < 60


def test_the_pixel_limit_holds_only_inside_its_block(tmp_path: Path) -> None:
    """prepare's decompression-bomb limit must not leak into later code of the same process (pictures, predict)."""
    from PIL import Image

    from tlpipe.images import pixel_limit

    before = Image.MAX_IMAGE_PIXELS
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pixel_limit(5000):
        with pytest.raises(ImageRejected):
            open_image(big)
    assert Image.MAX_IMAGE_PIXELS == before
    image, _ = open_image(big)
    assert image.size == (100, 100)
