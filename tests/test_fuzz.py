"""Property-based tests of the code that reads untrusted input: archives, image files and params.yaml.

Hypothesis generates the inputs: hostile zip archives for `prepare`, damaged and odd image files for its image
checks, and mistaken values for `validate`. Every input must end in a result or a one-line `PipelineError` (or,
for params, a list of one-line problems), never in another exception, and an archive must never make `prepare`
write outside its output folder. The runs are derandomized with a bounded number of examples, so that every run
tries the same inputs; a failure prints the smallest input that shows it. To search further, raise the number:
`TL_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from tests.helpers import PROJECT_ROOT
from tlpipe.errors import PipelineError
from tlpipe.images import pixel_limit
from tlpipe.params import validate
from tlpipe.preparation import Settings, check_image, prepare

# Derandomized: the same examples on every run and machine, so CI is reproducible. No example database: a
# failure found once is kept as an @example below instead, where every run tries it.
FUZZ = settings(
    max_examples=int(os.environ.get("TL_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SETTINGS = Settings(
    seed=0, val_fraction=0.2, test_fraction=0.2, max_extract_bytes=10**6, max_image_pixels=1 << 20, min_class_images=1
)
PARAMS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def is_one_line(text: str) -> bool:
    """Non-empty and without any line break Python knows (\\n, \\r, \\x85, U+2028, ...)."""
    return bool(text) and len(text.splitlines()) == 1 and text == text.splitlines()[0]


# --- inputs: images ------------------------------------------------------------------------------------------


def encoded(fmt: str, mode: str, size: tuple[int, int] = (6, 4), **save: Any) -> bytes:
    pixels = np.random.default_rng(len(mode) + size[0]).integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    if mode == "P" and fmt in ("PNG", "GIF"):
        save.setdefault("transparency", 0)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encoded("JPEG", "RGB", exif=exif.tobytes())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, color: int, pixels: bytes) -> bytes:
    """A PNG with any header fields, valid or not, and `pixels` compressed as its image data."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(pixels))
        + png_chunk(b"IEND", b"")
    )


def jpeg_header(width: int, height: int, tail: bytes) -> bytes:
    """A JPEG's start and a frame header declaring `width` x `height`, then whatever `tail` holds."""
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + tail


def gif_header(width: int, height: int, tail: bytes) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" + tail


def bmp_header(width: int, height: int, bits: int, tail: bytes) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(tail), 0, 0, 14 + len(info)) + info + tail


PALETTE_PNG = encoded("PNG", "P")  # converted by prepare, so written again under a new name
VALID_IMAGES = [
    encoded("JPEG", "RGB"),
    encoded("JPEG", "L"),
    encoded("JPEG", "CMYK"),
    encoded("PNG", "RGB"),
    encoded("PNG", "RGBA"),
    encoded("PNG", "LA"),
    PALETTE_PNG,
    encoded("PNG", "I;16"),
    encoded("PNG", "1"),
    encoded("GIF", "P"),
    encoded("BMP", "RGB"),
    encoded("WEBP", "RGBA"),
    encoded("TIFF", "RGB"),
    encoded("PNG", "RGB", size=(1, 1)),
    rotated(6),
    rotated(3),
    png(3, 2, 16, 2, bytes(1 + 3 * 6) * 2),  # 16-bit RGB, written by hand: Pillow cannot write it
]
HEADERS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xe1",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"RIFF\0\0\0\0WEBPVP8 ",
    b"II*\0",
    b"MM\0*",
]
dimensions = st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2**16 - 1, 2**31 - 1]))
short_dimensions = st.one_of(st.integers(0, 64), st.integers(0, 2**16 - 1), st.sampled_from([0, 1, 2**16 - 1]))
garbage = st.binary(max_size=300)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with bytes overwritten, or with garbage spliced in."""
    how = draw(st.sampled_from(["truncate", "flip", "splice", "keep"]))
    if how == "keep" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        value = draw(st.integers(0, 255))
        return data[:at] + bytes([value]) + data[at + 1 :]
    return data[:at] + draw(garbage) + data[at:]


image_files = st.one_of(
    garbage,
    st.builds(lambda header, tail: header + tail, st.sampled_from(HEADERS), garbage),
    st.sampled_from(VALID_IMAGES).flatmap(damaged),
    st.builds(
        png,
        dimensions,
        dimensions,
        st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]),
        st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
        st.binary(max_size=2000),
    ),
    st.builds(jpeg_header, short_dimensions, short_dimensions, garbage),
    st.builds(gif_header, short_dimensions, short_dimensions, garbage),
    st.builds(
        bmp_header,
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-(2**31), 2**31 - 1),
        st.sampled_from([1, 4, 8, 16, 24, 32, 0, 7]),
        garbage,
    ),
)


def assert_upright_rgb(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format in ("JPEG", "MPO", "PNG") and image.mode == "RGB", (image.format, image.mode)
        assert image.getexif().get(ExifTags.Base.Orientation, 1) == 1
        pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


@FUZZ
@given(data=image_files, name=st.sampled_from(["x.jpg", "x.png", "x", "x.gif.jpg"]))
def test_an_image_file_is_accepted_as_upright_8_bit_rgb_or_rejected_with_a_reason(
    data: bytes, name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    source = folder / name
    source.write_bytes(data)
    with pixel_limit(1 << 20):
        checked = check_image(source, folder / f"{name}.png")
    if checked.path is None:
        assert isinstance(checked.reason, str) and is_one_line(checked.reason), checked.reason
    else:
        assert checked.path.is_file() and checked.sha256
        assert_upright_rgb(checked.path)


# --- inputs: archives ----------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../evil.jpg",
    "a/../../evil.jpg",
    "/abs/evil.jpg",
    "C:/evil.jpg",
    "c:evil.jpg",
    "..\\evil.jpg",
    "a\\..\\..\\evil.jpg",
    "a/./b/x.jpg",
    "./a/x.jpg",
    "a//x.jpg",
    "",
    ".",
    "/",
    "...",
    "a/.../x.jpg",
    "__MACOSX/a/._x.jpg",
    "a/.DS_Store",
    ".hidden/x.jpg",
    "a/x.jpg/",
    "x" * 255,
    "a/" + "y" * 260 + ".jpg",
    "a/" + "é" * 130 + ".jpg",
    "train/a/x.jpg",
    "validation/b/x.jpg",
    "a/inner.zip",
]
segment = st.one_of(
    st.sampled_from(["a", "b", "train", "validation", "dataset", "..", ".", "...", "__MACOSX", "x.jpg", "x.png"]),
    # Any character but surrogates (a zip name is UTF-8) and NUL (zipfile ends a name there).
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1, max_size=12),
    st.integers(240, 270).map(lambda n: "z" * n),
)
entry_names = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.builds(lambda parts, sep: sep.join(parts), st.lists(segment, min_size=1, max_size=4), st.sampled_from("/\\")),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file, dir or symlink
    data: bytes
    compression: int


entries = st.builds(
    Entry,
    entry_names,
    st.sampled_from(["file", "file", "file", "dir", "symlink"]),
    st.one_of(st.binary(max_size=200), st.sampled_from(VALID_IMAGES), st.sampled_from([b"../../evil", b"/etc/passwd"])),
    st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
)
# A usable dataset under the hostile entries, so that some archives reach the layout, image checks and splits.
DATASET = [
    Entry(f"{label}/{label}{i}.png", "file", encoded("PNG", "RGB", size=(4 + i, 3)), zipfile.ZIP_DEFLATED)
    for label in ("a", "b")
    for i in range(3)
]


def zip_bytes(members: list[Entry]) -> bytes:
    kinds = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755, "symlink": stat.S_IFLNK | 0o777}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names it is asked to write
        for entry in members:
            suffix = "/" if entry.kind == "dir" and not entry.name.endswith("/") else ""
            info = zipfile.ZipInfo(entry.name + suffix)
            info.compress_type = entry.compression
            info.external_attr = kinds[entry.kind] << 16
            zf.writestr(info, b"" if entry.kind == "dir" else entry.data)
    return buffer.getvalue()


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    """A zip of hostile entries (with a usable dataset or not), sometimes damaged afterwards."""
    members = draw(st.lists(entries, max_size=6))
    if draw(st.booleans()):
        members = draw(st.permutations(DATASET + members))
    data = zip_bytes(members)
    return draw(damaged(data)) if draw(st.integers(0, 3)) == 0 else data


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (links not followed) with its kind and size: what a run may not change."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
        found[path.relative_to(folder).as_posix()] = f"{kind} {info.st_size if kind == 'file' else ''}"
    return found


def name_not_utf8() -> bytes:
    """A zip whose entry is flagged UTF-8 but whose local header spells the name in bytes that are not."""
    data = zip_bytes([Entry("\u0080", "file", b"", zipfile.ZIP_STORED)])
    return data.replace("\u0080".encode(), b"\0\x80", 1)  # the local header comes first


# Inputs the random search once found that prepare did not turn into a one-line error, kept as regressions.
FOUND = {
    "a folder entry named like a file before it": zip_bytes([*DATASET, Entry("a/a0.png/", "dir", b"", 0)]),
    "a folder name too long for the file system": zip_bytes([*DATASET, Entry("a/" + "y" * 300, "dir", b"", 0)]),
    "a file name too long once .png is added": zip_bytes([*DATASET, Entry("a/" + "z" * 252, "file", PALETTE_PNG, 0)]),
    "an entry name that is not UTF-8": name_not_utf8(),
}


@FUZZ
@example(data=FOUND["a folder entry named like a file before it"], max_extract_bytes=10**6, min_class_images=None)
@example(data=FOUND["a folder name too long for the file system"], max_extract_bytes=10**6, min_class_images=None)
@example(data=FOUND["a file name too long once .png is added"], max_extract_bytes=10**6, min_class_images=None)
@example(data=FOUND["an entry name that is not UTF-8"], max_extract_bytes=10**6, min_class_images=None)
@given(
    data=archives(),
    max_extract_bytes=st.sampled_from([10**6, 2000, 1]),
    min_class_images=st.sampled_from([None, 1, 3]),
)
def test_an_archive_is_prepared_or_refused_in_one_line_and_nothing_lands_outside_the_output(
    data: bytes, max_extract_bytes: int, min_class_images: int | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    box = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    work = box / "project" / "data"
    work.mkdir(parents=True)
    (archive := work / "dataset.zip").write_bytes(data)
    out = work / "prepared"
    before, beside = tree(box), sorted(os.listdir(box.parent))
    settings_ = dataclasses.replace(SETTINGS, max_extract_bytes=max_extract_bytes, min_class_images=min_class_images)
    try:
        report = prepare(archive, out, settings_)
    except PipelineError as error:
        assert is_one_line(str(error)), repr(str(error))
        assert not out.exists()
    else:
        assert isinstance(report, dict) and (out / "manifest.csv").is_file()
        assert not any(path.is_symlink() for path in out.rglob("*"))
    after = {path: kind for path, kind in tree(box).items() if not path.startswith("project/data/prepared/")}
    after.pop("project/data/prepared", None)
    assert after == before, "prepare wrote outside its output folder"
    assert sorted(os.listdir(box.parent)) == beside


# --- inputs: params.yaml -------------------------------------------------------------------------------------


def key_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of params.yaml, sections and values alike: ("data",), ("data", "url"), ..."""
    if not isinstance(node, dict):
        return []
    return [path for key, value in node.items() for path in [(*prefix, key), *key_paths(value, (*prefix, key))]]


PATHS = key_paths(PARAMS)
ODD_STRINGS = [
    "imagenet",
    "VGG16",
    "MobileNetV2",
    "",
    " ",
    "auto",
    "host:99999",
    "ray://host:1",
    "a" * 64,
    "mirrored",
    "multi_worker",
    "interval",
    "balanced",
    "block5",
    "x" * 5000,  # longer than any path the file system takes
    "weights/" + "y" * 300 + ".h5",
    "a\nb",
    "line\u2028separator",
    "nul\0byte",
    "../../etc/passwd",
    "/dev/null",
    "default",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(),  # NaN and both infinities included
    st.text(max_size=20),
    st.sampled_from(ODD_STRINGS),
)
keys = st.one_of(
    st.text(max_size=10), st.integers(), st.booleans(), st.none(), st.sampled_from([*ODD_STRINGS, "arch", "max_drop"])
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=6
)
mutations = st.lists(
    st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "set", "delete", "add"]), keys, values),
    min_size=1,
    max_size=3,
)


def mutated(params: dict[str, Any], changes: list[tuple[tuple[str, ...], str, Any, Any]]) -> dict[str, Any]:
    """A copy of `params` with each change applied where its path still leads to a mapping."""
    params = copy.deepcopy(params)
    for path, how, new_key, value in changes:
        node: Any = params
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if how == "set":
            node[path[-1]] = value
        elif how == "delete":
            node.pop(path[-1], None)
        elif isinstance(node.get(path[-1]), dict):
            node[path[-1]][new_key] = value
    return params


@FUZZ
@given(changes=mutations, whole=st.one_of(st.none(), values))
def test_params_validation_ends_in_one_line_problems_whatever_the_values(
    changes: list[tuple[tuple[str, ...], str, Any, Any]], whole: Any
) -> None:
    params = mutated(PARAMS, changes) if whole is None else whole
    problems = validate(params, PROJECT_ROOT)
    assert isinstance(problems, list)
    for problem in problems:
        assert isinstance(problem, str) and is_one_line(problem), repr(problem)


ODD_VALUES = [*ODD_STRINGS, None, True, 0, -1, 2**63, 10**400, -(10**400), math.nan, math.inf, -math.inf, [], {}, [1]]


def with_value(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    return mutated(PARAMS, [(path, "set", None, value)])


@pytest.mark.parametrize("path", PATHS, ids=".".join)
def test_every_parameter_given_any_odd_value_gets_one_line_problems(path: tuple[str, ...]) -> None:
    """Every value of ODD_VALUES at every key, and every odd key in every section: the grid the random
    examples above sample sparsely."""
    for value in ODD_VALUES:
        problems = validate(with_value(path, value), PROJECT_ROOT)
        assert all(is_one_line(problem) for problem in problems), (value, problems)
    default = PARAMS
    for key in path:
        default = default[key]
    if isinstance(default, dict):
        for key in ODD_STRINGS:
            problems = validate(mutated(PARAMS, [(path, "add", key, 1)]), PROJECT_ROOT)
            assert all(is_one_line(problem) for problem in problems), (key, problems)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        # NaN passes every `<` and `>` check, so a range check alone lets it through.
        assert validate(with_value(path, math.nan), PROJECT_ROOT), f"{'.'.join(path)}: NaN accepted"
