"""Bringing a dataset archive into place, complete and verified, or not at all.

The source may be an http(s):// URL, a file:// URL, a local zip, or a local image folder (packed into a
zip). The archive is replaced only when the source's bytes differ from it:
  - a local folder is packed deterministically (a local zip copied) beside the archive, and the new
    copy replaces the archive only if it differs;
  - an http(s) URL is asked with a conditional GET (If-None-Match / If-Modified-Since) whether it
    still holds what the last download received, as recorded in the source record; nothing is
    requested when a sha256 is given and the archive already matches it. When the server cannot
    be reached, an archive downloaded earlier from the same URL is used, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, url2pathname, urlopen

from tqdm import tqdm

from tlpipe import progress
from tlpipe.errors import PipelineError
from tlpipe.files import atomic_path, sha256_file, write_text
from tlpipe.paths import PARTIAL_DIR, SOURCE_RECORD

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


class _Unchanged(Exception):
    """Raised inside atomic_path to drop a new copy equal to the archive (atomic_path deletes it)."""


class SourceUnavailable(PipelineError):
    """The server could not be reached, or kept failing, on every attempt."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # what went wrong, without the advice


@dataclass(frozen=True)
class Validators:
    """What the server said identifies the version it sent (RFC 9110 section 8.8)."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_headers(cls, headers: Message) -> Validators:
        return cls(headers.get("ETag"), headers.get("Last-Modified"))

    def conditions(self) -> dict[str, str]:
        """Request headers that make the server answer 304 Not Modified if it still holds this version."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class Source:
    """What the archive was made from, as stored in source.json.

    It holds no time of checking, so an unchanged source leaves the file (and dvc.lock) as it was.
    """

    url: str
    sha256: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    # A local file source's modification time when it was copied: with its size, what lets the next check
    # skip copying and hashing it (DVC trusts the same pair for its own files).
    mtime_ns: int | None = None

    @property
    def validators(self) -> Validators:
        return Validators(self.etag, self.last_modified)


def fetch(
    url: str,
    target: Path,
    sha256: str | None,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30,
    partial_dir: Path = PARTIAL_DIR,
    record: Path | None = None,
) -> Path:
    """Bring `target` up to date with the dataset `url` names, checking `sha256` when given; return `target`.

    `target` is rewritten only when the source's bytes differ from it. `record` (by default
    source.json beside `target`) remembers what `target` was made from, for the next check.
    """
    target = Path(target)
    record = Path(record) if record is not None else target.with_name(SOURCE_RECORD.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        source = _sync_http(
            url,
            target,
            sha256,
            read_record(record),
            attempts=attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            partial_dir=Path(partial_dir),
        )
    elif scheme in (None, "file"):
        source = _sync_local(url, target, sha256, read_record(record))
    else:
        raise PipelineError(
            f"data.url {url!r} uses the unsupported scheme {scheme}://; use http://, https://, file:// or a local path"
        )
    write_record(record, source)
    return target


def url_scheme(url: str) -> str | None:
    """The lower-case scheme of `url`, or None for a plain path (including `C:\\...`)."""
    match = SCHEME.match(url.strip())
    return match.group(1).lower() if match else None


def partial_path(url: str, partial_dir: Path) -> Path:
    """Where the download of `url` accumulates; named by URL so a rerun finds and resumes it."""
    return partial_dir / f"{hashlib.sha1(url.encode('utf-8')).hexdigest()}.part"


def read_record(path: Path) -> Source | None:
    """The Source stored at `path`, or None if there is none or it cannot be read.

    A damaged record only costs a full download on the next check, so it is not an error.
    """
    try:
        source = Source(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    texts = (source.url, source.sha256)
    optional = (source.etag, source.last_modified)
    valid = (
        all(isinstance(text, str) for text in texts)
        and all(text is None or isinstance(text, str) for text in optional)
        and isinstance(source.size, int)
        and (source.mtime_ns is None or isinstance(source.mtime_ns, int))
    )
    return source if valid else None


def write_record(path: Path, source: Source) -> None:
    """Store `source` at `path`, leaving the file untouched when it already says the same."""
    # mtime_ns only where there is one (a local file), so that other sources' records read as before.
    fields = {name: value for name, value in asdict(source).items() if name != "mtime_ns" or value is not None}
    text = json.dumps(fields, indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)


def _digest(path: Path) -> str | None:
    """The sha256 of `path`, or None when there is no such file."""
    return sha256_file(path) if path.is_file() else None


def _decided(decision: str, detail: str) -> None:
    """The one line saying what fetch did; on stderr, so stdout keeps the stage's summary."""
    print(f"fetch: {decision}: {detail}", file=sys.stderr)


# --- local sources -------------------------------------------------------------------------------


def _sync_local(url: str, target: Path, sha256: str | None, previous: Source | None = None) -> Source:
    """Pack or copy the local source beside `target`; replace `target` only if the bytes differ.

    A file source with the size and modification time `previous` recorded, copied to a `target` of that
    size, is taken as unchanged without reading it: a no-op `dvc repro` then costs nothing here, whatever
    the archive's size.
    """
    source = local_source(url)
    existed = target.is_file()
    stat = source.stat() if source.is_file() else None
    if (
        stat is not None
        and existed
        and previous is not None
        and (previous.url, previous.size, previous.mtime_ns) == (url, stat.st_size, stat.st_mtime_ns)
        and target.stat().st_size == previous.size
        and (sha256 is None or sha256.lower() == previous.sha256)
    ):
        _decided("unchanged", f"{url} has the size and modification time it had when copied to {target}")
        return previous
    try:
        with atomic_path(target) as tmp:
            if source.is_dir():
                pack_directory(source, tmp)
            else:
                _copy_with_progress(source, tmp)
            # Raising inside the block makes atomic_path delete the copy: unverified, or not needed.
            digest = _verify(tmp, sha256, url)
            size = tmp.stat().st_size
            if existed and target.stat().st_size == size and sha256_file(target) == digest:
                raise _Unchanged
    except _Unchanged:
        _decided("unchanged", f"{url} holds the same data as {target}; left as it is")
    else:
        made = "packed" if source.is_dir() else "copied"
        if existed:
            _decided("updated", f"{url} changed; {target} replaced with a new copy")
        else:
            _decided(made, f"{target} from {url}")
    return Source(url, digest, size, mtime_ns=stat.st_mtime_ns if stat else None)


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
    with (
        zipfile.ZipFile(archive_path, "w", zipfile.ZIP_STORED) as archive,
        _progress(total, f"pack {source.name}") as bar,
    ):
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
    with (
        source.open("rb") as src,
        target.open("wb") as dst,
        _progress(source.stat().st_size, f"copy {source.name}") as bar,
    ):
        _copy_stream(src, dst, bar)


def _copy_stream(src: BinaryIO, dst: BinaryIO, bar: tqdm) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        bar.update(len(chunk))


# --- HTTP ----------------------------------------------------------------------------------------


def _sync_http(
    url: str,
    target: Path,
    sha256: str | None,
    previous: Source | None,
    *,
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    partial_dir: Path,
) -> Source:
    """Download `url` to `target` unless `target` already holds what the server (or `sha256`) says it should."""
    have = _digest(target)
    if sha256 and have == sha256.lower():
        _decided("unchanged", f"{target} matches data.sha256; {url} not contacted")
        if previous is not None and previous.url == url and previous.sha256 == have:
            return previous  # keeps the validators for when the pin is lifted
        return Source(url, sha256.lower(), target.stat().st_size)
    # The version to ask the server about: what an earlier run downloaded from this URL, still intact.
    # A pinned sha256 that the archive misses must be downloaded, never excused by a 304 or an outage.
    cached = previous if not sha256 and previous and previous.url == url and previous.sha256 == have else None
    partial = partial_path(url, partial_dir)
    try:
        try:
            received = download(
                url,
                partial,
                attempts=attempts,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                unless=cached.validators if cached else None,
                # With an archive to fall back on, waiting out an outage would only delay the warning.
                retry_unreachable=cached is None,
            )
        except SourceUnavailable as error:
            if cached is None:
                raise
            warning = f"warning: cannot check {url} for changes ({error.reason}); using the existing {target}"
            print(warning, file=sys.stderr)
            return cached
        if received is None:
            assert cached is not None, "304 answers only a conditional request, which needs `cached`"
            _decided("unchanged", f"{url} not modified since the last download (HTTP 304); {target} left as it is")
            return cached
        digest = _verify(partial, sha256, url)
        source = Source(url, digest, partial.stat().st_size, received.etag, received.last_modified)
        if digest == have:
            partial.unlink()  # new validators, same bytes: keep the archive so DVC sees no change
            _decided("unchanged", f"{url} sent the same bytes as {target} holds; left as it is")
        elif have:
            _move_into_place(partial, target)
            _decided("updated", f"{url} changed; {target} replaced with the new download")
        else:
            _move_into_place(partial, target)
            _decided("downloaded", f"{target} from {url}")
        return source
    finally:
        _remove_if_empty(partial_dir)  # fails harmlessly while a partial is kept to resume


def download(
    url: str,
    partial: Path,
    *,
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    unless: Validators | None = None,
    retry_unreachable: bool = True,
) -> Validators | None:
    """Complete `partial` from `url`, retrying transient failures and resuming what was received.

    With `unless`, the request is conditional: None means the server still holds that version
    (304 Not Modified) and sent nothing. Otherwise returns the validators of what was received.
    `retry_unreachable=False` gives up at the first failure to connect, for a caller with a fallback.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(url, partial, timeout_s, unless)
        except _Transient as error:
            failure = error
        if attempt == attempts or (failure.unreachable and not retry_unreachable):
            break
        time.sleep(backoff_s * 2 ** (attempt - 1))
    raise _give_up(url, partial, failure, attempt)


def _download_once(url: str, partial: Path, timeout_s: float, unless: Validators | None) -> Validators | None:
    """One attempt; network problems become _Transient, permanent ones PipelineError."""
    try:
        response = _open(url, partial, timeout_s, unless)
        if response is None:
            return Validators()  # the partial already held the whole file; its version is unknown
        with response:
            _receive(url, response, partial)
            return Validators.from_headers(response.headers)
    except HTTPError as error:
        error.close()
        if error.code == 304 and unless is not None:
            return None
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


def _open(url: str, partial: Path, timeout_s: float, unless: Validators | None) -> http.client.HTTPResponse | None:
    """The response for the bytes `partial` lacks, or None if `partial` already holds the whole file."""
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        return urlopen(_request(url, offset, unless), timeout=timeout_s)
    except HTTPError as error:
        if error.code != 416 or not offset:
            raise
        total = _content_range(error.headers.get("Content-Range"))[1]
        error.close()
        if total == offset:
            return None
        # The partial is longer than, or unrelated to, what the server holds now: start over.
        partial.unlink()
        return urlopen(_request(url, 0, unless), timeout=timeout_s)


def _request(url: str, offset: int, unless: Validators | None) -> Request:
    headers = {"User-Agent": "dvc-pipeline-fetch"}
    if offset:
        # A resumed download asks for the rest of the file it started, not whether an older one changed.
        headers["Range"] = f"bytes={offset}-"
    elif unless is not None:
        headers.update(unless.conditions())
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


def _give_up(url: str, partial: Path, failure: _Transient, attempts: int) -> SourceUnavailable:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    file_name = PurePosixPath(urlsplit(url).path).name or "dataset.zip"
    local_copy = f"download it elsewhere and set data.url in params.yaml to file:///path/to/{file_name} or a local path"
    if failure.unreachable:
        host = urlsplit(url).hostname
        reason = f"host {host} cannot be reached: {failure}"
        return SourceUnavailable(f"host {host} cannot be reached for {url} ({failure}); {local_copy}", reason)
    kept = partial.exists() and partial.stat().st_size > 0
    resume = "; rerun to resume the partial download" if kept else ""
    message = f"{failure} for {url} after {tries}{resume}; try again later, or {local_copy}"
    return SourceUnavailable(message, f"{failure} after {tries}")


# --- finishing -----------------------------------------------------------------------------------


def _verify(path: Path, expected: str | None, url: str) -> str:
    """The sha256 of `path`; raise if it is not `expected`, deleting `path` so no rerun resumes from bad bytes."""
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        path.unlink(missing_ok=True)
        raise PipelineError(
            f"sha256 mismatch for {url}: expected {expected.lower()}, got {actual}; "
            "the download was deleted. If the file changed on purpose, update data.sha256 in params.yaml"
        )
    return actual


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
    return progress.bar(total, description, "B", initial=initial, unit_scale=True, unit_divisor=1024, leave=False)
