"""Stage `fetch`: bring the dataset to `data/raw/dataset.zip`, complete and verified, or not at all.

`data.url` may be an http(s):// URL, a file:// URL, a local zip, or a local image folder
(`train/<class>/` + `validation/<class>/`, or `<class>/`), which is packed into a zip.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import shutil
import ssl
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, url2pathname, urlopen

from tqdm import tqdm

from stages.common import RAW_ARCHIVE, PipelineError, atomic_path, stage_main
from stages.params import load_params

PARTIAL_DIR = Path("data/.downloads")
CHUNK = 1 << 20
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
SKIPPED_NAMES = {"__MACOSX"}  # besides hidden names (".DS_Store", "._x.jpg", ".git")
RETRIED_CLIENT_ERRORS = {408, 429}  # request timeout and rate limiting pass with time
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class _Transient(Exception):
    """A failed download attempt that may succeed when tried again."""

    def __init__(self, detail: str, *, unreachable: bool = False) -> None:
        super().__init__(detail)
        self.unreachable = unreachable


def fetch(
    url: str,
    target: Path,
    sha256: str | None,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30,
    partial_dir: Path = PARTIAL_DIR,
) -> Path:
    """Put the dataset named by `url` at `target`, checking `sha256` when given; return `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        partial = partial_path(url, Path(partial_dir))
        try:
            download(url, partial, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s)
            _verify(partial, sha256, url)
            _move_into_place(partial, target)
        finally:
            _remove_if_empty(Path(partial_dir))  # fails harmlessly while a partial is kept to resume
        return target
    if scheme not in (None, "file"):
        raise PipelineError(
            f"data.url {url!r} uses the unsupported scheme {scheme}://; "
            "use http://, https://, file:// or a local path"
        )
    source = local_source(url)
    with atomic_path(target) as tmp:
        if source.is_dir():
            pack_directory(source, tmp)
        else:
            _copy_with_progress(source, tmp)
        # Raising inside the block makes atomic_path delete the unverified copy.
        _verify(tmp, sha256, url)
    return target


def url_scheme(url: str) -> str | None:
    """The lower-case scheme of `url`, or None for a plain path (including `C:\\...`)."""
    match = SCHEME.match(url.strip())
    return match.group(1).lower() if match else None


def partial_path(url: str, partial_dir: Path) -> Path:
    """Where the download of `url` accumulates; named by URL so a rerun finds and resumes it."""
    return partial_dir / f"{hashlib.sha1(url.encode('utf-8')).hexdigest()}.part"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- local sources -------------------------------------------------------------------------------


def local_source(url: str) -> Path:
    """The existing file or folder that a file:// URL or a plain path names."""
    if url_scheme(url) == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise PipelineError(f"data.url {url!r} names a remote host; use file:///absolute/path instead")
        path = Path(url2pathname(parts.path))
    else:
        path = Path(url).expanduser()
    if not path.exists():
        raise PipelineError(
            f"{url}: no such file or folder (looked for {path.absolute()}); "
            "check data.url in params.yaml (relative paths start at the project root)"
        )
    return path


def pack_directory(source: Path, archive_path: Path) -> None:
    """Zip the files under `source` so that equal contents always give a byte-identical archive.

    Entries are sorted and carry a fixed timestamp and mode, so the archive's hash (and DVC's cache)
    does not change when files are merely touched or copied. Images are already compressed, so
    they are stored as they are.
    """
    files = sorted(_packable_files(source), key=lambda item: item[0])
    if not files:
        raise PipelineError(f"{source} has no files to pack; check data.url in params.yaml")
    total = sum(path.stat().st_size for _, path in files)
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_STORED) as archive, _progress(
        total, f"pack {source.name}"
    ) as bar:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            info.file_size = path.stat().st_size  # lets zipfile decide on zip64 before writing
            with path.open("rb") as src, archive.open(info, "w") as dst:
                _copy_stream(src, dst, bar)


def _packable_files(source: Path) -> Iterator[tuple[str, Path]]:
    """(name in the archive, path) of every file under `source`, skipping macOS and hidden litter."""
    for folder, subfolders, names in os.walk(source):
        # Pruning in place keeps os.walk out of hidden folders such as .git.
        subfolders[:] = [name for name in subfolders if not _skipped(name)]
        for name in names:
            path = Path(folder, name)
            if not _skipped(name) and path.is_file():
                yield PurePosixPath(*path.relative_to(source).parts).as_posix(), path


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_NAMES


def _copy_with_progress(source: Path, target: Path) -> None:
    with source.open("rb") as src, target.open("wb") as dst, _progress(
        source.stat().st_size, f"copy {source.name}"
    ) as bar:
        _copy_stream(src, dst, bar)


def _copy_stream(src: BinaryIO, dst: BinaryIO, bar: tqdm) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        bar.update(len(chunk))


# --- HTTP ----------------------------------------------------------------------------------------


def download(url: str, partial: Path, *, attempts: int, backoff_s: float, timeout_s: float) -> None:
    """Complete `partial` from `url`, retrying transient failures and resuming what was received."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            _download_once(url, partial, timeout_s)
            return
        except _Transient as error:
            failure = error
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise _give_up(url, partial, failure, attempts)


def _download_once(url: str, partial: Path, timeout_s: float) -> None:
    """One attempt; network problems become _Transient, permanent ones PipelineError."""
    try:
        response = _open(url, partial, timeout_s)
        if response is None:
            return
        with response:
            _receive(url, response, partial)
    except HTTPError as error:
        error.close()
        if error.code >= 500 or error.code in RETRIED_CLIENT_ERRORS:
            raise _Transient(_status_text(error.code, error.reason)) from None
        raise PipelineError(
            f"{_status_text(error.code, error.reason)} for {url}; check data.url in params.yaml"
        ) from None
    except URLError as error:
        # urlopen wraps failures to connect: refused, DNS, unreachable network, connect timeout.
        if isinstance(error.reason, ssl.SSLError):
            raise PipelineError(f"TLS error for {url}: {error.reason}") from None
        raise _Transient(str(error.reason), unreachable=True) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
        # Failures after the connection was made: the server went away mid-body or stalled.
        raise _Transient(f"{type(error).__name__}: {error}".rstrip(": ")) from None


def _open(url: str, partial: Path, timeout_s: float) -> http.client.HTTPResponse | None:
    """The response for the bytes `partial` lacks, or None if `partial` already holds the whole file."""
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        return urlopen(_request(url, offset), timeout=timeout_s)
    except HTTPError as error:
        if error.code != 416 or not offset:
            raise
        total = _content_range(error.headers.get("Content-Range"))[1]
        error.close()
        if total == offset:
            return None
        # The partial is longer than, or unrelated to, what the server holds now: start over.
        partial.unlink()
        return urlopen(_request(url, 0), timeout=timeout_s)


def _request(url: str, offset: int) -> Request:
    headers = {"User-Agent": "dvc-pipeline-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return Request(url, headers=headers)


def _receive(url: str, response: http.client.HTTPResponse, partial: Path) -> None:
    """Append the response body to `partial` (206), or replace `partial` with it (200)."""
    offset = partial.stat().st_size if partial.exists() else 0
    if response.status == 206 and offset:
        start = _content_range(response.headers.get("Content-Range"))[0]
        if start != offset:
            partial.unlink()
            raise _Transient(f"server sent bytes from {start}, not {offset}; starting over")
        mode = "ab"
    else:
        # A 200 answer is the whole file: the server ignored Range, or there was nothing to resume.
        offset, mode = 0, "wb"
    length_header = response.headers.get("Content-Length")
    expected = int(length_header) if length_header and length_header.isdigit() else None
    total = offset + expected if expected is not None else None
    received = 0
    name = PurePosixPath(urlsplit(url).path).name or "download"
    with partial.open(mode) as out, _progress(total, name, initial=offset) as bar:
        try:
            # read1 hands over whatever has arrived, so a timeout loses none of it; read(n) would
            # hold up to n bytes in its buffer and drop them with the exception.
            while chunk := response.read1(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except http.client.IncompleteRead as error:
            out.write(error.partial)
            received += len(error.partial)
    # http.client returns a short body without complaint when the server closes early.
    if expected is not None and received < expected:
        raise _Transient(f"connection closed after {offset + received} of {total} bytes")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes 100-199/200` or `bytes */200`; None where unknown."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _status_text(code: int, reason: object) -> str:
    return f"HTTP {code} {reason}".rstrip()


def _give_up(url: str, partial: Path, failure: _Transient, attempts: int) -> PipelineError:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    file_name = PurePosixPath(urlsplit(url).path).name or "dataset.zip"
    local_copy = (
        f"download it elsewhere and set data.url in params.yaml to file:///path/to/{file_name} "
        "or a local path"
    )
    if failure.unreachable:
        host = urlsplit(url).hostname
        return PipelineError(f"host {host} cannot be reached for {url} ({failure}); {local_copy}")
    kept = partial.exists() and partial.stat().st_size > 0
    resume = "; rerun to resume the partial download" if kept else ""
    return PipelineError(f"{failure} for {url} after {tries}{resume}; try again later, or {local_copy}")


# --- finishing -----------------------------------------------------------------------------------


def _verify(path: Path, expected: str | None, url: str) -> None:
    """Raise if `path` does not hash to `expected`, deleting it so no rerun resumes from bad bytes."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise PipelineError(
            f"sha256 mismatch for {url}: expected {expected.lower()}, got {actual}; "
            "the download was deleted. If the file changed on purpose, update data.sha256 in params.yaml"
        )


def _move_into_place(source: Path, target: Path) -> None:
    """Rename `source` onto `target`, copying atomically when they are on different filesystems."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        source.unlink()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # other downloads still in progress, or already gone


def _progress(total: int | None, description: str, *, initial: int = 0) -> tqdm:
    # disable=None: draw only on a terminal, so CI logs don't fill with carriage returns.
    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None,
        leave=False,
    )


@stage_main
def main() -> None:
    data = load_params()["data"]
    archive = fetch(data["url"], RAW_ARCHIVE, data["sha256"])
    digest = data["sha256"] or file_sha256(archive)
    pin = "" if data["sha256"] else " (set data.sha256 to this to pin the dataset)"
    print(f"{archive}: {archive.stat().st_size} bytes, sha256 {digest.lower()}{pin}")


if __name__ == "__main__":
    main()
