"""Open untrusted image files safely and turn them into 8-bit RGB, for `prepare` and `predict`.

The TensorFlow input pipeline decodes JPEG and PNG files itself and ignores EXIF orientation,
alpha and bit depth, so anything that is not a plain 8-bit RGB JPEG/PNG is normalised here once.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from tlpipe.errors import PipelineError

# Formats whose files TensorFlow's decode_jpeg/decode_png read as they are (MPO is a multi-picture JPEG).
TF_READY_FORMATS = {"JPEG", "MPO", "PNG"}
ORIENTATION = ExifTags.Base.Orientation
WHITE = (255, 255, 255)


class ImageRejected(PipelineError):
    """A file that cannot be used as an image; `reason` says why, in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the file holds, read before decoding changes it."""

    format: str
    mode: str
    size: tuple[int, int]
    bits: int
    orientation: int
    transparency: bool

    def describe(self) -> str:
        extra = f", EXIF orientation {self.orientation}" if self.orientation != 1 else ""
        return f"{self.format} {self.mode} {self.bits}-bit{extra}"


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, Pillow refuses images with more than `max_pixels` pixels (decompression bombs).

    Pillow only warns between 1x and 2x its limit; turning that warning into an error makes the limit exact.
    The warning filter is process-wide, so it also holds in worker threads. Both are restored afterwards, so
    the limit never leaks into other code of the same process.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def open_image(path: Path, decode_tf_ready: bool = True) -> tuple[Image.Image, ImageInfo]:
    """Open `path`, check it and decode it fully; raise ImageRejected with the reason when it is unusable.

    decode_tf_ready=False: a file TensorFlow reads as it is (is_tf_ready) is checked but left undecoded, for a
    caller that decodes it with TensorFlow: decoding it here too would hold the pixels twice.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageRejected(path, "empty file (0 bytes)")
        # verify() checks structure and checksums that load() does not, but leaves the image unusable.
        with Image.open(path) as probe:
            _check_pixels(path, probe)
            probe.verify()
        image = Image.open(path)
        try:
            info = _info(image)
            if decode_tf_ready or not is_tf_ready(info):
                image.load()
        except BaseException:
            image.close()
            raise
    except ImageRejected:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        # Not the file's content: it vanished (deleted while a folder was being read) or may not be read.
        raise ImageRejected(path, f"cannot read ({error.strerror})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(path, f"too many pixels ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(path, "not an image") from None
    except Exception as error:  # decoders of untrusted files fail in many ways; each means "unusable"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        kind = "truncated" if "truncated" in message.lower() or isinstance(error, EOFError) else "does not decode"
        raise ImageRejected(path, f"{kind} ({message})") from None
    return image, info


def is_tf_ready(info: ImageInfo) -> bool:
    """Whether TensorFlow decodes the file to the same pixels we see: 8-bit RGB JPEG/PNG, upright, opaque."""
    return (
        info.format in TF_READY_FORMATS
        and info.mode == "RGB"
        and info.bits == 8
        and info.orientation == 1
        and not info.transparency
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy: EXIF orientation applied, 16-bit scaled down, alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        image = _sixteen_to_eight_bit(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_pixels(path: Path, image: Image.Image) -> None:
    # Pillow's own check can be switched off by the warning filters of whoever calls us; ours cannot.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageRejected(path, f"too many pixels ({width}x{height} > {limit})")


def _info(image: Image.Image) -> ImageInfo:
    # The raw mode of the first tile is the only place Pillow keeps a 16-bit PNG's depth for RGB.
    tile_mode = ""
    if image.tile:
        args = image.tile[0].args
        tile_mode = args if isinstance(args, str) else (args[0] if args else "")
    bits = 16 if "16" in str(tile_mode) or image.mode.startswith("I") else 8
    return ImageInfo(
        format=image.format or "unknown",
        mode=image.mode,
        size=image.size,
        bits=bits,
        orientation=_orientation(image),
        transparency=image.has_transparency_data,
    )


def _orientation(image: Image.Image) -> int:
    # A PNG's getexif() decodes all its pixels to look for an eXIf chunk after them; one without that chunk
    # is upright, which its list of chunks tells without decoding (predict decodes it with TensorFlow instead).
    filename = getattr(image, "filename", "")
    if image.format == "PNG" and "exif" not in image.info and filename and not _png_has_exif_chunk(filename):
        return 1
    orientation = image.getexif().get(ORIENTATION, 1)
    return orientation if isinstance(orientation, int) else 1


def _png_has_exif_chunk(path: str) -> bool:
    """Whether the PNG file holds an eXIf chunk; True also where its chunks are damaged, so that Pillow's
    decoder is the one that says how."""
    with open(path, "rb") as file:
        file.seek(8)  # the signature
        while len(header := file.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return True
            if kind == b"IEND":
                return False
            file.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return True


def _sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them, which turns most pixels white.
    values = np.asarray(image).astype(np.float64)
    scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)
