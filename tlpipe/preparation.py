"""Turning a dataset archive into checked images and a manifest: safe unpacking, image checks, seeded splits.

What it writes (in a temporary sibling folder, renamed into place at the end) is described in
stages/prepare.py. Only the images the manifest lists stay in it: every other file the archive held (not an
image, undecodable, too many pixels, outside the class folders) is deleted once checked, and listed in the
report with its reason. A class with fewer usable images than data.min_class_images, or too few in one folder to
reach every split, is left out and listed in the report; with data.min_class_images null, such a class stops
the run instead, with one line naming the class, its folder and the images it needs.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import re
import shutil
import stat
import sys
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tlpipe import progress
from tlpipe.datasets import SPLITS
from tlpipe.errors import PipelineError, one_line, quoted
from tlpipe.files import atomic_dir, is_hidden, sha256_file, write_json
from tlpipe.images import ImageRejected, is_tf_ready, open_image, pixel_limit, to_rgb
from tlpipe.paths import CLASSES, MANIFEST, REPORT

SPLIT_LAYOUT = "train/validation"
CLASS_TREE_LAYOUT = "class folders"
CHUNK_BYTES = 1 << 20
DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
REFETCH = "delete it and rerun `dvc repro -f fetch`"
# Archives inside the archive are not unpacked (each would need its own limits); by these endings they are
# named in the error that finds no classes or no images, so that the user knows to unpack them.
ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".tgz",
    ".tar.gz",
    ".tbz2",
    ".tar.bz2",
    ".txz",
    ".tar.xz",
    ".tar.zst",
    ".7z",
    ".rar",
)
# How many inner archives such an error names before `and N more`.
SHOWN_ARCHIVES = 3
# The fewest usable images a class folder needs so that the class reaches every split, by Layout.sources
# key: train/<class> gives 1 validation and 1 training image, validation/<class> the test split, and a
# single <class>/ tree 1 test, 1 validation and 1 training image (carve never takes a folder's last ones).
NEEDED = {"train": 2, "test": 1, "all": 3}
NEEDED_FOR = {
    "train": "1 for validation, 1 for training",
    "test": "1 for the test split",
    "all": "1 each for the test, validation and training splits",
}
# A class with fewer training images than this gets a warning (the run goes on). Ten because below it each
# picture is over a tenth of what the head learns for the class, so one odd or mislabelled image shifts it,
# and the default val_fraction (0.2) leaves the class only one or two validation images, so early stopping
# and the class's scores move in big steps per image.
MIN_TRAIN_IMAGES = 10
# How many classes a one-line summary names before `and N more`.
SHOWN_CLASSES = 5


@dataclass(frozen=True)
class Settings:
    seed: int
    val_fraction: float
    test_fraction: float
    max_extract_bytes: int
    max_image_pixels: int
    # Classes with fewer usable images are left out (listed in the report); None: a class too small for
    # every split stops the run.
    min_class_images: int | None = None
    # Archives with more entries (files and folders) are refused before anything is unpacked.
    max_archive_entries: int = 1_000_000

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        data = params["data"]
        return cls(
            seed=params["seed"],
            val_fraction=data["val_fraction"],
            test_fraction=data["test_fraction"],
            max_extract_bytes=data["max_extract_bytes"],
            max_image_pixels=data["max_image_pixels"],
            min_class_images=data["min_class_images"],
            max_archive_entries=data["max_archive_entries"],
        )


@dataclass(frozen=True)
class Layout:
    kind: str  # SPLIT_LAYOUT or CLASS_TREE_LAYOUT
    root: Path  # the dataset root folder inside images/
    classes: list[str]
    # The folders that hold one folder per class: {"train": .., "test": ..} or {"all": root}.
    sources: dict[str, Path]


@dataclass(frozen=True)
class Checked:
    source: Path  # the file as unpacked
    path: Path | None  # the file the manifest points at; None when skipped
    reason: str = ""  # why it was skipped
    converted_from: str = ""  # what it was before it was rewritten as PNG
    sha256: str = ""  # of the file at `path`, for the manifest


def prepare(archive: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Build `out_dir` from `archive` and return the report.

    Manifest paths start with `out_dir`, so they are relative to the project root when `out_dir` is.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    with pixel_limit(settings.max_image_pixels), atomic_dir(out_dir) as build:
        images = build / "images"
        ignored = extract_archive(archive, images, settings.max_extract_bytes, settings.max_archive_entries)
        # Listed now: the image checks delete them with every other file that is not an image.
        nested = inner_archives(images)
        try:
            layout = find_layout(images, archive)
            files, unused = files_by_class_folder(layout, images)
            checked = check_images(sorted((p for paths in files.values() for p in paths), key=Path.as_posix), images)
            remove_files(unused)
            usable = {folder: usable_files(paths, checked) for folder, paths in files.items()}
            shortfalls = class_shortfalls(layout, files, checked, usable, images, archive, settings.min_class_images)
            if settings.min_class_images is None and shortfalls:
                raise PipelineError(f"{next(iter(shortfalls.values()))}: add images or remove the class")
            layout, left_out = leave_out(layout, shortfalls, usable, images)
        except PipelineError as error:
            if not nested:
                raise
            raise PipelineError(f"{error}; {nested_archives_hint(nested, images, archive)}") from None
        rows = assign_splits(layout, usable, settings)
        warnings = small_class_warnings(layout, rows, images, archive)
        if line := small_class_line(warnings):
            print(f"warning: {line}", file=sys.stderr)
        public = functools.partial(public_path, images=images, out_dir=out_dir)
        removed = [root / item["class"] for item in left_out for root in layout.sources.values()]
        outcomes = [item for item in checked.values() if not any(item.source.is_relative_to(f) for f in removed)]
        outcomes += [Checked(path, None, "not in a class folder") for path in unused]
        report = build_report(archive, images, layout, rows, outcomes, ignored, public) | {
            "warnings": warnings,
            "left_out": left_out,
        }
        # Plain writes suffice: the whole build folder is renamed into place only once complete.
        digests = {item.path: item.sha256 for item in checked.values() if item.path is not None}
        write_manifest(build / MANIFEST.name, rows, digests, public)
        write_json(build / CLASSES.name, layout.classes)
        write_json(build / REPORT.name, report)
    return report


def public_path(path: Path, images: Path, out_dir: Path) -> str:
    """Where `path` (inside the build folder) will be once the build folder is renamed to `out_dir`."""
    return (out_dir / "images" / path.relative_to(images)).as_posix()


def extract_archive(archive: Path, target: Path, max_bytes: int, max_entries: int) -> int:
    """Unpack `archive` into `target` safely; return how many hidden and __MACOSX entries were ignored."""
    with open_archive(archive, max_entries) as zf:
        # Check every entry before writing anything, so a refused archive leaves nothing behind.
        check_entry_count(archive, len(zf.infolist()), max_entries)
        entries = [(info, member_parts(info, archive)) for info in zf.infolist()]
        check_declared_size(archive, [info for info, _ in entries], max_bytes)
        target.mkdir(parents=True)
        ignored = 0
        budget = max_bytes
        for info, parts in progress.bar(len(entries), "unpack", "file", iterable=entries):
            if not parts:
                continue
            if is_ignored(parts):
                if not is_dir_entry(info):
                    ignored += 1
                continue
            # Safe without resolving: no part is "..", none is absolute, no links are created and
            # `target` is a fresh folder, so the path cannot lead outside it.
            dest = target.joinpath(*parts)
            if is_dir_entry(info):
                make_folder(dest, info, archive)
                continue
            budget -= extract_member(zf, info, dest, budget, archive)
    return ignored


def open_archive(archive: Path, max_entries: int) -> zipfile.ZipFile:
    if not archive.is_file():
        raise PipelineError(f"{archive} not found; run `dvc repro fetch` first")
    try:
        # The end record's count first: ZipFile reads the whole central directory into memory, about
        # a kilobyte per entry, before anything could look at it.
        if (declared := declared_entry_count(archive)) is not None:
            check_entry_count(archive, declared, max_entries)
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise PipelineError(f"{archive} is not a valid zip archive ({error}); {REFETCH}") from None


def declared_entry_count(archive: Path) -> int | None:
    """The entry count the zip's end record declares (zip64 included), read as ZipFile itself reads it first;
    None where this Python's zipfile lacks the reader or finds no end record (ZipFile then says what is wrong)."""
    read_end = getattr(zipfile, "_EndRecData", None)
    if read_end is None:
        return None
    with archive.open("rb") as file:
        end = read_end(file)
    return None if end is None else int(end[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])


def check_entry_count(archive: Path, count: int, max_entries: int) -> None:
    # Checked twice: on the end record's count, and on the entries read, in case the end record lies.
    if count > max_entries:
        raise PipelineError(
            f"{archive} has {count:,} entries, more than data.max_archive_entries ({max_entries:,}); refusing "
            "it before unpacking (raise the limit if you trust the archive)"
        )


def member_parts(info: zipfile.ZipInfo, archive: Path) -> tuple[str, ...]:
    """The entry's path components; refuse entries that could write outside the target folder."""
    name = info.filename.replace("\\", "/")  # Windows tools write backslashes; treat them as separators
    if name.startswith("/") or DRIVE_LETTER.match(name):
        raise PipelineError(f"{archive}: entry {quoted(info.filename)} has an absolute path; refusing the archive")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PipelineError(f"{archive}: entry {quoted(info.filename)} points outside the archive (..); refusing it")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise PipelineError(f"{archive}: entry {quoted(info.filename)} is a symbolic link; refusing the archive")
    return parts


def check_declared_size(archive: Path, infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise PipelineError(
            f"{archive} would unpack to {declared:,} bytes, more than data.max_extract_bytes "
            f"({max_bytes:,}); refusing a possible zip bomb (raise the limit if you trust the archive)"
        )


def is_ignored(parts: tuple[str, ...]) -> bool:
    # macOS metadata and hidden files (.DS_Store, ._x.jpg, .git/...) are never images of the dataset.
    return parts[0] == "__MACOSX" or any(is_hidden(part) for part in parts)


def is_dir_entry(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith(("/", "\\"))


def make_folder(dest: Path, info: zipfile.ZipInfo, archive: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a name too long for the file system, or a file entry of the same name before it
        reason = error.strerror or type(error).__name__
        raise PipelineError(f"{archive}: cannot create folder entry {quoted(info.filename)} ({reason})") from None


def extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: int, archive: Path) -> int:
    """Write one entry to `dest`; return its size. Never writes more than `budget` bytes."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, dest.open("xb") as dst:  # "x": a repeated entry must not overwrite
            written = copy_limited(src, dst, budget)
    except FileExistsError:
        raise PipelineError(f"{archive}: entry {quoted(info.filename)} appears twice; refusing the archive") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as error:  # ValueError: a name that is not UTF-8
        raise PipelineError(f"{archive} is damaged at entry {quoted(info.filename)} ({error}); {REFETCH}") from None
    except (NotImplementedError, RuntimeError) as error:  # unsupported compression, encryption
        raise PipelineError(f"{archive}: cannot unpack entry {quoted(info.filename)} ({error})") from None
    except OSError as error:
        raise PipelineError(f"{archive}: cannot write entry {quoted(info.filename)} ({error})") from None
    if written > budget:
        raise PipelineError(
            f"{archive}: entry {quoted(info.filename)} unpacks to more bytes than its header declares, past "
            "data.max_extract_bytes; refusing a possible zip bomb"
        )
    return written


def copy_limited(src: BinaryIO | io.BufferedIOBase, dst: BinaryIO, budget: int) -> int:
    """Copy `src` to `dst` and return the byte count; stop after `budget` + 1 bytes (the caller's alarm)."""
    written = 0
    while written <= budget:
        chunk = src.read(min(CHUNK_BYTES, budget + 1 - written))
        if not chunk:
            break
        dst.write(chunk)
        written += len(chunk)
    return written


# --- finding the classes --------------------------------------------------------------------------


def find_layout(images: Path, archive: Path) -> Layout:
    """Either <root>/train + <root>/validation with one folder per class, or one folder per class."""
    root = find_split_root(images, archive)
    if root is not None:
        return split_layout(images, root, archive)
    return class_tree_layout(images, archive)


def find_split_root(images: Path, archive: Path) -> Path | None:
    """The shallowest folder that holds both train/ and validation/, or None."""
    level = [images]
    while level:
        found = [folder for folder in level if (folder / "train").is_dir() and (folder / "validation").is_dir()]
        if len(found) > 1:
            names = ", ".join(shown(folder, images, archive) for folder in found)
            raise PipelineError(f"several folders hold train/ and validation/: {names}; keep only one")
        if found:
            return found[0]
        level = [child for folder in level for child in subfolders(folder)]
    return None


def split_layout(images: Path, root: Path, archive: Path) -> Layout:
    train, test = root / "train", root / "validation"
    classes = class_names(train, images, archive)
    test_classes = [folder.name for folder in subfolders(test)]
    if test_classes != classes:
        raise PipelineError(
            f"{shown(train, images, archive)} has classes {', '.join(map(quoted, classes))} but "
            f"{shown(test, images, archive)} has {', '.join(map(quoted, test_classes)) or 'none'}; they must match"
        )
    return Layout(SPLIT_LAYOUT, root, classes, {"train": train, "test": test})


def class_tree_layout(images: Path, archive: Path) -> Layout:
    root = images
    top = subfolders(images)
    # Archives made by zipping a folder put everything inside that one folder; a lone folder without
    # subfolders is a single class instead, which class_names then reports.
    if len(top) == 1 and subfolders(top[0]) and not any(path.is_file() for path in images.iterdir()):
        root = top[0]
    classes = class_names(root, images, archive)
    return Layout(CLASS_TREE_LAYOUT, root, classes, {"all": root})


def class_names(folder: Path, images: Path, archive: Path) -> list[str]:
    names = [child.name for child in subfolders(folder)]
    if len(names) < 2:
        found = f"only {quoted(names[0])}" if names else "none"
        raise PipelineError(
            f"{shown(folder, images, archive)} needs at least two class folders, found {found}; "
            "expected <root>/train/<class>/ and <root>/validation/<class>/, or <class>/ folders"
        )
    return names


def subfolders(folder: Path) -> list[Path]:
    return sorted((child for child in folder.iterdir() if child.is_dir()), key=lambda p: p.name)


def files_by_class_folder(layout: Layout, images: Path) -> tuple[dict[Path, list[Path]], list[Path]]:
    """The files under each class folder (subfolders included), and all files outside them."""
    folders = [source / name for source in layout.sources.values() for name in layout.classes]
    files = {folder: all_files(folder) for folder in folders}
    in_classes = {path for paths in files.values() for path in paths}
    return files, [path for path in all_files(images) if path not in in_classes]


def all_files(folder: Path) -> list[Path]:
    # Sorted so that the seeded shuffle sees the same order on every file system.
    return sorted((path for path in folder.rglob("*") if path.is_file()), key=Path.as_posix)


def shown(folder: Path, images: Path, archive: Path) -> str:
    """How the user finds `folder`: its path inside the archive."""
    inside = folder.relative_to(images).as_posix()
    return f"folder {one_line(inside) + '/' if inside != '.' else '(top level)'} in {archive}"


# --- checking the images ---------------------------------------------------------------------------


def check_images(files: list[Path], images: Path) -> dict[Path, Checked]:
    """Decode every file in parallel (Pillow releases the GIL); convert those TensorFlow cannot use as-is; hash
    the files kept."""
    pngs = png_names(files, set(all_files(images)))
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda path: check_image(path, pngs[path]), files)
        checked = list(progress.bar(len(files), "check images", iterable=results))
    return {item.source: item for item in checked}


def png_names(files: list[Path], existing: set[Path]) -> dict[Path, Path]:
    """A free `<name>.png` for each file, chosen up front so parallel conversions never collide."""
    taken = set(existing)
    names = {}
    for path in files:
        candidate, number = path.with_name(f"{path.name}.png"), 1
        while candidate in taken:
            candidate, number = path.with_name(f"{path.name}.{number}.png"), number + 1
        taken.add(candidate)
        names[path] = candidate
    return names


def check_image(source: Path, png: Path) -> Checked:
    """Keep `source`, rewrite it as the 8-bit RGB PNG `png`, or skip it with the reason and delete it: a file
    that is not a usable image has no place in the prepared data (DVC would cache it, at any size)."""
    try:
        image, info = open_image(source)
    except ImageRejected as rejected:
        source.unlink(missing_ok=True)
        return Checked(source, None, rejected.reason)
    with image:
        if is_tf_ready(info):
            return Checked(source, source, sha256=sha256_file(source))
        try:
            rgb = to_rgb(image)
        except Exception as error:  # e.g. a colour space Pillow cannot map to RGB
            source.unlink()
            return Checked(source, None, f"cannot convert to RGB ({error})")
    try:
        rgb.save(png, format="PNG")
    except OSError as error:  # e.g. a name the file system refuses once `.png` is added
        source.unlink()
        return Checked(source, None, f"cannot write its PNG copy ({error.strerror or type(error).__name__})")
    source.unlink()
    return Checked(source, png, converted_from=info.describe(), sha256=sha256_file(png))


def remove_files(paths: list[Path]) -> None:
    """Delete files the report lists as skipped without checking them (outside every class folder)."""
    for path in paths:
        path.unlink()


def inner_archives(images: Path) -> list[Path]:
    """The files under `images` whose names end like an archive (ARCHIVE_SUFFIXES)."""
    return [path for path in all_files(images) if path.name.lower().endswith(ARCHIVE_SUFFIXES)]


def nested_archives_hint(nested: list[Path], images: Path, archive: Path) -> str:
    """What to do about archives inside the archive, which prepare does not unpack, naming the first few."""
    names = ", ".join(quoted(path.relative_to(images).as_posix()) for path in nested[:SHOWN_ARCHIVES])
    more = f" and {len(nested) - SHOWN_ARCHIVES} more" if len(nested) > SHOWN_ARCHIVES else ""
    what = "an archive" if len(nested) == 1 else f"{len(nested)} archives"
    return (
        f"{archive} holds {what} inside it ({names}{more}), which prepare does not unpack: unpack "
        f"{'it' if len(nested) == 1 else 'them'} and zip the folders of images instead"
    )


def usable_files(files: list[Path], checked: dict[Path, Checked]) -> list[Path]:
    return sorted((checked[path].path for path in files if checked[path].path is not None), key=Path.as_posix)


# --- class sizes -----------------------------------------------------------------------------------


def class_shortfalls(
    layout: Layout,
    files: dict[Path, list[Path]],
    checked: dict[Path, Checked],
    usable: dict[Path, list[Path]],
    images: Path,
    archive: Path,
    minimum: int | None,
) -> dict[str, str]:
    """Why each class that cannot be kept falls short, in layout order: fewer than `minimum` usable images in
    all, or too few in one of its folders for the class to reach every split (NEEDED)."""
    shortfalls = {}
    for label in layout.classes:
        total = sum(len(usable[root / label]) for root in layout.sources.values())
        if minimum is not None and total < minimum:
            shortfalls[label] = (
                f"class {quoted(label)} has {total} usable image{'s' if total != 1 else ''}, fewer than "
                f"data.min_class_images ({minimum})"
            )
            continue
        for source, root in layout.sources.items():
            folder = root / label
            if len(usable[folder]) < NEEDED[source]:
                found = usable_count(files[folder], checked, len(usable[folder]))
                shortfalls[label] = (
                    f"{shown(folder, images, archive)} (class {quoted(label)}) has {found}; the class needs at least "
                    f"{NEEDED[source]} there ({NEEDED_FOR[source]})"
                )
                break
    return shortfalls


def leave_out(
    layout: Layout, shortfalls: dict[str, str], usable: dict[Path, list[Path]], images: Path
) -> tuple[Layout, list[dict[str, Any]]]:
    """The layout without the classes of `shortfalls`, whose folders are deleted from the build (their images
    are not part of the prepared data), and the report's list of them. Says so in one line."""
    if not shortfalls:
        return layout, []
    classes = [label for label in layout.classes if label not in shortfalls]
    if len(classes) < 2:
        kept = f"only {quoted(classes[0])} is" if classes else "no class is"
        raise PipelineError(
            f"{len(shortfalls)} of {len(layout.classes)} classes are too small to keep and {kept} left; the "
            f"first: {next(iter(shortfalls.values()))}; add images or lower data.min_class_images"
        )
    left_out = []
    for label, reason in shortfalls.items():
        images_found = sum(len(usable[root / label]) for root in layout.sources.values())
        left_out.append({"class": label, "usable_images": images_found, "reason": reason})
        for root in layout.sources.values():
            shutil.rmtree(root / label)
    named = ", ".join(f"{quoted(item['class'])} ({item['usable_images']})" for item in left_out[:SHOWN_CLASSES])
    more = f" and {len(left_out) - SHOWN_CLASSES} more" if len(left_out) > SHOWN_CLASSES else ""
    print(
        f"prepare: left out {len(left_out)} of {len(layout.classes)} classes too small to reach every split or "
        f"under data.min_class_images (usable images): {named}{more}; each with its reason in {REPORT} `left_out`",
        file=sys.stderr,
    )
    return dataclasses.replace(layout, classes=classes), left_out


def usable_count(files: list[Path], checked: dict[Path, Checked], usable: int) -> str:
    """'no files', 'no usable images: all 2 files were skipped (e.g. ...)' or '1 usable image (...)'."""
    if not files:
        return "no files"
    skipped = [checked[path] for path in files if checked[path].path is None]
    example = f"e.g. {one_line(skipped[0].source.name)}: {one_line(skipped[0].reason)}" if skipped else ""
    if not usable:
        return f"no usable images: all {len(files)} files were skipped ({example})"
    count = f"{usable} usable image{'s' if usable != 1 else ''}"
    return f"{count} ({len(skipped)} more skipped, {example})" if skipped else count


def small_class_warnings(
    layout: Layout, rows: list[tuple[Path, str, str]], images: Path, archive: Path
) -> list[dict[str, Any]]:
    """One warning per class with fewer than MIN_TRAIN_IMAGES images in the train split (for the report)."""
    train = {label: 0 for label in layout.classes}
    for _, label, split in rows:
        if split == "train":
            train[label] += 1
    source = layout.sources["train" if layout.kind == SPLIT_LAYOUT else "all"]
    warnings = []
    for label, count in train.items():
        if count < MIN_TRAIN_IMAGES:
            message = (
                f"class {quoted(label)} has {count} training image{'s' if count != 1 else ''} after the split "
                f"(from {shown(source / label, images, archive)}), under the recommended minimum of "
                f"{MIN_TRAIN_IMAGES}; its scores rest on very few images, so add images if you can"
            )
            warnings.append({"class": label, "train_images": count, "minimum": MIN_TRAIN_IMAGES, "message": message})
    return warnings


def small_class_line(warnings: list[dict[str, Any]]) -> str | None:
    """All the small-class warnings in one line (the full list is the report's `warnings`); None without any."""
    if not warnings:
        return None
    if len(warnings) == 1:
        return warnings[0]["message"]
    ordered = sorted(warnings, key=lambda warning: (warning["train_images"], warning["class"]))
    named = ", ".join(f"{quoted(w['class'])} ({w['train_images']})" for w in ordered[:SHOWN_CLASSES])
    more = f" and {len(warnings) - SHOWN_CLASSES} more" if len(warnings) > SHOWN_CLASSES else ""
    return (
        f"{len(warnings)} classes have fewer than {MIN_TRAIN_IMAGES} training images after the split, the "
        f"recommended minimum: {named}{more}; their scores rest on very few images (each is listed in "
        f"{REPORT} `warnings`), so add images if you can"
    )


# --- splitting ----------------------------------------------------------------------------------


def assign_splits(layout: Layout, usable: dict[Path, list[Path]], settings: Settings) -> list[tuple[Path, str, str]]:
    """(path, label, split) for every usable image, sorted by split (train, val, test) and path."""
    rng = np.random.default_rng(settings.seed)
    rows = []
    for label in layout.classes:
        if layout.kind == SPLIT_LAYOUT:
            val, train = carve(usable[layout.sources["train"] / label], settings.val_fraction, rng)
            test = usable[layout.sources["test"] / label]
        else:
            # keep=2: a large test_fraction must still leave one validation and one training image.
            test, rest = carve(usable[layout.sources["all"] / label], settings.test_fraction, rng, keep=2)
            val, train = carve(rest, settings.val_fraction, rng)
        for split, paths in (("train", train), ("val", val), ("test", test)):
            rows += [(path, label, split) for path in paths]
    return sorted(rows, key=lambda row: (SPLITS.index(row[2]), row[0].as_posix()))


def carve(files: list[Path], fraction: float, rng: np.random.Generator, keep: int = 1) -> tuple[list[Path], list[Path]]:
    """Split off round(fraction * n) random files: at least one, and at least `keep` left, when n > keep."""
    n = len(files)
    count = min(max(round(fraction * n), 1), n - keep) if n > keep else 0
    chosen = set(rng.permutation(n)[:count].tolist())
    taken = [path for i, path in enumerate(files) if i in chosen]
    rest = [path for i, path in enumerate(files) if i not in chosen]
    return taken, rest


# --- writing the outputs ------------------------------------------------------------------------------


def write_manifest(
    path: Path, rows: list[tuple[Path, str, str]], digests: dict[Path, str], public: Callable[[Path], str]
) -> None:
    """path,label,split,sha256 of each image. The digests make the manifest stand for the images' contents:
    later stages declare it as their dependency instead of the folder of images, which DVC would otherwise
    walk once per stage on every `dvc repro` (docs/performance.md, "Scaling")."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split", "sha256"])
    writer.writerows((public(image), label, split, digests[image]) for image, label, split in rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def build_report(
    archive: Path,
    images: Path,
    layout: Layout,
    rows: list[tuple[Path, str, str]],
    checked: list[Checked],
    ignored: int,
    public: Callable[[Path], str],
) -> dict[str, Any]:
    counts = {split: {label: 0 for label in layout.classes} for split in SPLITS}
    for _, label, split in rows:
        counts[split][label] += 1
    skipped = [{"path": public(item.source), "reason": item.reason} for item in checked if item.path is None]
    converted = [
        {"path": public(item.path), "from": item.converted_from, "original": public(item.source)}
        for item in checked
        if item.converted_from and item.path is not None
    ]
    return {
        "archive": archive.as_posix(),
        "layout": layout.kind,
        "dataset_root": layout.root.relative_to(images).as_posix(),
        "classes": layout.classes,
        "counts": counts,
        "total": len(rows),
        "skipped": sorted(skipped, key=lambda item: item["path"]),
        "converted": sorted(converted, key=lambda item: item["path"]),
        "ignored": ignored,
    }


def summary(report: dict[str, Any]) -> str:
    sizes = ", ".join(f"{split} {sum(report['counts'][split].values())}" for split in SPLITS)
    return (
        f"prepared {report['total']} images of {len(report['classes'])} classes ({sizes}); "
        f"skipped {len(report['skipped'])}, converted {len(report['converted'])}, "
        f"ignored {report['ignored']} hidden entries"
    )
