"""Bringing a dataset archive into place, complete and verified, or not at all.

The source may be an http(s):// URL, a file:// URL, a local zip, or a local image folder (packed into a
zip). The archive is replaced only when the source's bytes differ from it:
  - a local folder is packed deterministically (a local zip copied) beside the archive, and the new
    copy replaces the archive only if it differs;
  - an http(s) URL is asked with a conditional GET (If-None-Match / If-Modified-Since) whether it
    still holds what the last download received, as recorded in the source record; nothing is
    requested when a sha256 is given and the archive already matches it. When the server cannot
    be reached, an archive downloaded earlier from the same URL is used, with a warning.

Every source is bounded (`Limits`: bytes, an overall deadline, a minimum rate) and must be a readable zip
before it replaces the archive; a failed fetch leaves the archive and its record as they were. A local
folder never reads outside itself. URLs are shown and recorded only as `redacted` spells them.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, unquote_plus, urlsplit
from urllib.request import HTTPHandler, HTTPSHandler, OpenerDirector, Request, build_opener, url2pathname

from tqdm import tqdm

from tlpipe import progress
from tlpipe.errors import PipelineError
from tlpipe.files import atomic_path, is_hidden, sha256_file, write_text
from tlpipe.paths import PARTIAL_DIR, SOURCE_RECORD

CHUNK = 1 << 20
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
SKIPPED_NAMES = {"__MACOSX"}  # besides hidden names (".DS_Store", "._x.jpg", ".git")
RETRIED_CLIENT_ERRORS = {408, 429}  # request timeout and rate limiting pass with time
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query (and fragment) keys whose values are credentials: tokens, signatures (X-Amz-Signature, sig), keys,
# passwords. A false match only hides a harmless value from the logs.
SECRET_KEY = re.compile(r"token|sig|secret|pass|pwd|key|auth|cred|session|jwt|code", re.IGNORECASE)
HIDDEN = "***"
# Every zip record starts with "PK" (a local file header, or an empty archive's end record): a download
# that starts otherwise (an HTML login page, an error text) is refused at its first bytes.
ZIP_MAGIC = b"PK"
# Slows down guessing a password from the record's url_hash (source.json may be shared with the data).
URL_HASH_ROUNDS = 100_000


@dataclass(frozen=True)
class Limits:
    """How much one fetch may take (data.max_download_bytes, data.download_deadline, data.min_download_rate).

    The rate is averaged over `rate_window_s`, so a slow start or a short stall is not punished; a server
    that goes silent altogether is caught by the per-read timeout and retried.
    """

    max_bytes: int = 4_000_000_000
    deadline_s: float = 3600.0
    min_rate: float = 10_000.0  # bytes per second
    rate_window_s: float = 30.0


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
    # Where `url` is redacted (it held a password or a token): a hash of the full URL, so that a change of
    # the hidden part is still seen as a changed source. Absent for URLs with nothing to hide.
    url_hash: str | None = None

    @property
    def validators(self) -> Validators:
        return Validators(self.etag, self.last_modified)

    def made_from(self, url: str) -> bool:
        """Whether this record was made from `url`, secrets included."""
        return self.url_hash == url_hash(url) if self.url_hash else self.url == url


def source_of(url: str, sha256: str, size: int, **fields: str | int | None) -> Source:
    """The record of an archive made from `url`, holding the URL only as `redacted` spells it."""
    shown = redacted(url)
    return Source(shown, sha256, size, **fields, url_hash=url_hash(url) if shown != url else None)


def url_hash(url: str) -> str:
    """A slow salted hash of `url`: tells whether the URL changed without showing (or cheaply testing) its secrets."""
    salt = redacted(url).encode("utf-8")
    digest = hashlib.pbkdf2_hmac("sha256", url.encode("utf-8"), salt, URL_HASH_ROUNDS)
    return f"pbkdf2-sha256:{URL_HASH_ROUNDS}:{digest.hex()}"


def redacted(url: str) -> str:
    """`url` as it may be shown and recorded: a password (or a lone user name, often a token) in it, and
    the value of every query or fragment key that looks like a secret, replaced by ***. Plain paths are
    returned as they are."""
    parts = _url_parts(url)
    if parts is None:
        return url
    scheme, userinfo, rest, query, fragment = parts
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        rest = (f"{user}:{HIDDEN}@" if colon else f"{HIDDEN}@") + rest
    query = f"?{_redacted_pairs(query)}" if query is not None else ""
    fragment = f"#{_redacted_pairs(fragment)}" if fragment is not None else ""
    return scheme + rest + query + fragment


def _url_parts(url: str) -> tuple[str, str | None, str, str | None, str | None] | None:
    """(blanks and scheme://, user info or None, host and path, query or None, fragment or None), split by
    hand so that a URL urlsplit rejects (a broken [IPv6] host) is still redacted; None for a plain path."""
    match = SCHEME.match(url.lstrip())  # url_scheme() allows leading blanks, so must this
    if not match:
        return None
    start = len(url) - len(url.lstrip()) + match.end()
    end = next((i for i, char in enumerate(url[start:], start) if char in "/?#"), len(url))
    userinfo, at, host = url[start:end].rpartition("@")
    rest, hash_mark, fragment = url[end:].partition("#")
    path, question, query = rest.partition("?")
    return (
        url[:start],
        userinfo if at else None,
        host + path,
        query if question else None,
        fragment if hash_mark else None,
    )


def _secret_pairs(text: str) -> Iterator[tuple[str, str]]:
    """(key, value) of each `key=value` in a query or fragment whose key looks like a secret's."""
    for pair in re.split(r"[&;]", text):
        key, _, value = pair.partition("=")
        if value and SECRET_KEY.search(unquote_plus(key)):
            yield key, value


def _redacted_pairs(text: str) -> str:
    """`a=1&token=x` with secret-looking keys' values hidden, the rest as written."""
    pieces = []
    for piece in re.split(r"([&;])", text):  # the separators are kept as pieces of their own
        key, _, value = piece.partition("=")
        pieces.append(f"{key}={HIDDEN}" if value and SECRET_KEY.search(unquote_plus(key)) else piece)
    return "".join(pieces)


def _secrets(url: str) -> list[str]:
    """The parts of `url` that `redacted` hides, raw and decoded, longest first (to scrub other messages)."""
    parts = _url_parts(url)
    if parts is None:
        return []
    _, userinfo, _, query, fragment = parts
    found = set()
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        found.add(password if colon else user)
    for text in (query or "", fragment or ""):
        found.update(value for _, value in _secret_pairs(text))
    found |= {unquote_plus(secret) for secret in found} | {unquote(secret) for secret in found}
    # Very short values would blank out ordinary words; redacted() already hides them in the URL itself.
    return sorted((secret for secret in found if len(secret) >= 3), key=len, reverse=True)


def scrubbed(text: str, url: str) -> str:
    """`text` with `url` shown redacted and any of its secrets (say, quoted in a library's error) hidden."""
    text = text.replace(url, redacted(url))
    for secret in _secrets(url):
        text = text.replace(secret, HIDDEN)
    return text


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
    limits: Limits = Limits(),
) -> Path:
    """Bring `target` up to date with the dataset `url` names, checking `sha256` when given; return `target`.

    `target` is rewritten only when the source's bytes differ from it, and only with a readable zip.
    `record` (by default source.json beside `target`) remembers what `target` was made from, for the next
    check. On any error both are left as they were, and the error says so.
    """
    target = Path(target)
    record = Path(record) if record is not None else target.with_name(SOURCE_RECORD.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    existed = target.is_file()
    try:
        source = _sync(url, target, sha256, record, attempts, backoff_s, timeout_s, Path(partial_dir), limits)
    except PipelineError as error:
        # Messages may quote the URL, or a library's text about it: neither may show its secrets.
        kept = f"; kept the previous {target}" if existed else ""
        error.args = (scrubbed(str(error), url) + kept, *error.args[1:])
        raise
    write_record(record, source)
    return target


def _sync(
    url: str,
    target: Path,
    sha256: str | None,
    record: Path,
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    partial_dir: Path,
    limits: Limits,
) -> Source:
    """What `target` now holds, after bringing it up to date with the source by its kind."""
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        return _sync_http(
            url,
            target,
            sha256,
            read_record(record),
            attempts=attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            partial_dir=partial_dir,
            limits=limits,
        )
    if scheme in (None, "file"):
        return _sync_local(url, target, sha256, read_record(record), limits)
    raise PipelineError(
        f"data.url {redacted(url)!r} uses the unsupported scheme {scheme}://; "
        "use http://, https://, file:// or a local path"
    )


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
    optional = (source.etag, source.last_modified, source.url_hash)
    valid = (
        all(isinstance(text, str) for text in texts)
        and all(text is None or isinstance(text, str) for text in optional)
        and isinstance(source.size, int)
        and (source.mtime_ns is None or isinstance(source.mtime_ns, int))
    )
    return source if valid else None


def write_record(path: Path, source: Source) -> None:
    """Store `source` at `path`, leaving the file untouched when it already says the same."""
    # mtime_ns and url_hash only where there is one (a local file; a URL with secrets), so that other
    # sources' records read as before.
    optional = ("mtime_ns", "url_hash")
    fields = {name: value for name, value in asdict(source).items() if name not in optional or value is not None}
    text = json.dumps(fields, indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)


def _digest(path: Path) -> str | None:
    """The sha256 of `path`, or None when there is no such file."""
    return sha256_file(path) if path.is_file() else None


def _decided(decision: str, detail: str, url: str) -> None:
    """The one line saying what fetch did; on stderr, so stdout keeps the stage's summary."""
    _say(f"fetch: {decision}: {detail}", url)


def _say(line: str, url: str) -> None:
    print(scrubbed(line, url), file=sys.stderr)


# --- local sources -------------------------------------------------------------------------------


def _sync_local(url: str, target: Path, sha256: str | None, previous: Source | None, limits: Limits) -> Source:
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
        and previous.made_from(url)
        and (previous.size, previous.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        and target.stat().st_size == previous.size
        and (sha256 is None or sha256.lower() == previous.sha256)
    ):
        _decided("unchanged", f"{url} has the size and modification time it had when copied to {target}", url)
        return previous
    try:
        with atomic_path(target) as tmp:
            if source.is_dir():
                pack_directory(source, tmp, limits.max_bytes)
            else:
                _copy_with_progress(source, tmp, limits.max_bytes)
            # Raising inside the block makes atomic_path delete the copy: unverified, or not needed.
            digest = _verify(tmp, sha256, url)
            require_zip(tmp, url)
            size = tmp.stat().st_size
            if existed and target.stat().st_size == size and sha256_file(target) == digest:
                raise _Unchanged
    except _Unchanged:
        _decided("unchanged", f"{url} holds the same data as {target}; left as it is", url)
    else:
        made = "packed" if source.is_dir() else "copied"
        if existed:
            _decided("updated", f"{url} changed; {target} replaced with a new copy", url)
        else:
            _decided(made, f"{target} from {url}", url)
    return source_of(url, digest, size, mtime_ns=stat.st_mtime_ns if stat else None)


def local_source(url: str) -> Path:
    """The existing regular file or folder that a file:// URL or a plain path names."""
    if url_scheme(url) == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise PipelineError(f"data.url {redacted(url)!r} names a remote host; use file:///absolute/path instead")
        path = Path(url2pathname(parts.path))
    else:
        path = Path(url).expanduser()
    if not path.exists():
        raise PipelineError(
            f"{url}: no such file or folder (looked for {path.absolute()}); "
            "check data.url in params.yaml (relative paths start at the project root)"
        )
    if not (path.is_file() or path.is_dir()):
        # A device or a pipe (/dev/zero, /dev/stdin) never ends, or ends somewhere unrepeatable.
        raise PipelineError(f"{url} is neither a regular file nor a folder; check data.url in params.yaml")
    return path


def pack_directory(source: Path, archive_path: Path, max_bytes: int = Limits.max_bytes) -> None:
    """Zip the files under `source` so that equal contents always give a byte-identical archive.

    Entries are sorted and carry a fixed timestamp and mode, so the archive's hash (and DVC's cache)
    does not change when files are merely touched or copied. Images are already compressed, so
    they are stored as they are. A symbolic link leading out of `source` is refused (`_packable_files`).
    """
    files = sorted(_packable_files(source), key=lambda item: item[0])
    if not files:
        raise PipelineError(f"{source} has no files to pack; check data.url in params.yaml")
    total = sum(path.stat().st_size for _, path in files)
    if total > max_bytes:
        raise PipelineError(
            f"{source} holds {total:,} bytes of files, more than data.max_download_bytes ({max_bytes:,}); "
            "raise data.max_download_bytes in params.yaml if the dataset really is that big"
        )
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
    """(name in the archive, path to read) of every file under `source`, skipping macOS and hidden litter.

    A symbolic link whose target lies inside `source` is packed under the link's name (read through its
    target); one leading outside `source`, or to a folder that contains it, is refused: packing it would
    put files from elsewhere (/etc/passwd, a home folder) into the archive and DVC's cache, and skipping
    it would change the dataset without a word.
    """
    root = source.resolve()
    yield from _walk(source, source, root, PurePosixPath(), (root,))


def _walk(
    source: Path, folder: Path, root: Path, prefix: PurePosixPath, ancestors: tuple[Path, ...]
) -> Iterator[tuple[str, Path]]:
    """`_packable_files` below `folder`, whose real path is ancestors[-1]; `ancestors` guard against loops."""
    with os.scandir(folder) as entries:
        listing = sorted(entries, key=lambda entry: entry.name)
    for entry in listing:
        if _skipped(entry.name):  # keeps the walk out of hidden folders such as .git
            continue
        path = Path(entry.path)
        name = prefix / entry.name
        real = ancestors[-1] / entry.name
        if entry.is_symlink():
            real = path.resolve()
            if not real.is_relative_to(root):
                raise PipelineError(
                    f"{path} is a symbolic link to {real}, outside {source}; data.url's folder may only "
                    "link inside itself: copy the file in, or point data.url at a folder holding both"
                )
        if entry.is_dir():  # follows a link, which by now stays inside
            if real in ancestors:
                raise PipelineError(
                    f"{path} is a symbolic link to {real}, a folder that contains it; remove the link "
                    "(it would pack the folder into itself for ever)"
                )
            yield from _walk(source, path, root, name, (*ancestors, real))
        elif entry.is_file():  # a regular file, or a link to one; pipes, devices and broken links are not
            yield name.as_posix(), real


def _skipped(name: str) -> bool:
    return is_hidden(name) or name in SKIPPED_NAMES


def _copy_with_progress(source: Path, target: Path, max_bytes: int = Limits.max_bytes) -> None:
    size = source.stat().st_size
    if size > max_bytes:
        raise _too_big(str(source), f"is {size:,} bytes", max_bytes)
    with source.open("rb") as src, target.open("wb") as dst, _progress(size, f"copy {source.name}") as bar:
        _copy_stream(src, dst, bar, max_bytes)
    if target.stat().st_size > max_bytes:  # the file grew while it was copied
        raise _too_big(str(source), "grew", max_bytes)


def _copy_stream(src: BinaryIO, dst: BinaryIO, bar: tqdm, max_bytes: int | None = None) -> None:
    copied = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        bar.update(len(chunk))
        copied += len(chunk)
        if max_bytes is not None and copied > max_bytes:
            return  # the caller sees the size and refuses it


def _too_big(shown: str, what: str, max_bytes: int) -> PipelineError:
    return PipelineError(
        f"{shown} {what} more than data.max_download_bytes ({max_bytes:,} bytes); refused. Raise "
        "data.max_download_bytes in params.yaml if the dataset really is that big, or check data.url"
    )


def require_zip(path: Path, url: str) -> None:
    """Raise unless `path` is a zip whose central directory can be read; delete it then (no rerun resumes it)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
            return
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass
    try:
        looks = _looks_like(_head(path, 512), path.stat().st_size)
    except OSError:
        looks = "unreadable"
    path.unlink(missing_ok=True)
    raise PipelineError(f"{url} is not a zip archive ({looks}); check data.url in params.yaml")


def _looks_like(head: bytes, size: int | None = None) -> str:
    """What bytes that are not a zip seem to be, without quoting them (they may be a secret, like /etc/passwd).

    `size` is None for a download refused at its first bytes, whose size is unknown.
    """
    of = f" of {size:,} bytes" if size is not None else ""
    if size == 0 or not head:
        return "empty"
    if re.match(rb"\s*<(!doctype html|html|\?xml|!--)", head.lstrip(b"\xef\xbb\xbf"), re.IGNORECASE):
        return f"an HTML or XML page{of}: often a login or error page"
    if size is None:
        return "its first bytes are not a zip's"
    return f"{size:,} bytes that do not start or end like a zip"


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
    limits: Limits = Limits(),
) -> Source:
    """Download `url` to `target` unless `target` already holds what the server (or `sha256`) says it should."""
    have = _digest(target)
    if sha256 and have == sha256.lower():
        _decided("unchanged", f"{target} matches data.sha256; {url} not contacted", url)
        if previous is not None and previous.made_from(url) and previous.sha256 == have:
            return previous  # keeps the validators for when the pin is lifted
        return source_of(url, sha256.lower(), target.stat().st_size)
    # The version to ask the server about: what an earlier run downloaded from this URL, still intact.
    # A pinned sha256 that the archive misses must be downloaded, never excused by a 304 or an outage.
    intact = previous is not None and previous.made_from(url) and previous.sha256 == have
    cached = previous if not sha256 and intact else None
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
                limits=limits,
            )
        except SourceUnavailable as error:
            if cached is None:
                raise
            _say(f"warning: cannot check {url} for changes ({error.reason}); using the existing {target}", url)
            return cached
        if received is None:
            assert cached is not None, "304 answers only a conditional request, which needs `cached`"
            _decided("unchanged", f"{url} not modified since the last download (HTTP 304); {target} left as it is", url)
            return cached
        digest = _verify(partial, sha256, url)
        require_zip(partial, url)
        source = source_of(
            url, digest, partial.stat().st_size, etag=received.etag, last_modified=received.last_modified
        )
        if digest == have:
            partial.unlink()  # new validators, same bytes: keep the archive so DVC sees no change
            _decided("unchanged", f"{url} sent the same bytes as {target} holds; left as it is", url)
        elif have:
            _move_into_place(partial, target)
            _decided("updated", f"{url} changed; {target} replaced with the new download", url)
        else:
            _move_into_place(partial, target)
            _decided("downloaded", f"{target} from {url}", url)
        return source
    finally:
        _remove_if_empty(partial_dir)  # fails harmlessly while a partial is kept to resume


class _Clock:
    """The overall deadline of one download (all its attempts and waits) and its minimum rate."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url, self.limits = url, limits
        self.ends_at = time.monotonic() + limits.deadline_s
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.expired = False

    def left(self) -> float:
        return self.ends_at - time.monotonic()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Shut the download's connections down at the deadline, wherever it waits: a read timeout bounds
        only one wait, so a server trickling its headers (or a TLS handshake) could otherwise go on for ever."""
        timer = threading.Timer(max(self.left(), 0.0), self._expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)

    def connect(
        self, address: tuple[str, int], timeout: float | None = None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """socket.create_connection, for http.client, with the socket watched by the deadline."""
        sock = socket.create_connection(address, timeout, source_address)
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def check(self, received: int, failure: str = "") -> None:
        """Raise once the deadline has passed."""
        if self.left() <= 0:
            raise self.out_of_time(received, failure)

    def out_of_time(self, received: int, failure: str = "") -> SourceUnavailable:
        deadline = f"{self.limits.deadline_s:g} s"
        after = f" (last failure: {failure})" if failure else ""
        reason = f"not complete within data.download_deadline ({deadline}; {received:,} bytes received){after}"
        return SourceUnavailable(
            f"{self.url} {reason}; raise data.download_deadline in params.yaml, or rerun to resume; "
            f"{_local_copy(self.url)}",
            reason,
        )


class _Rate:
    """Bytes received in the current window of `limits.rate_window_s` seconds, checked as each window ends."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url, self.limits = url, limits
        self.started, self.received = time.monotonic(), 0

    def add(self, count: int) -> None:
        self.received += count
        elapsed = time.monotonic() - self.started
        if elapsed < self.limits.rate_window_s:
            return
        if self.received < self.limits.min_rate * elapsed:
            rate = f"{self.received:,} bytes in {elapsed:.1f} s ({self.received / elapsed:,.1f} bytes/s)"
            reason = f"sending {rate}, slower than data.min_download_rate ({self.limits.min_rate:,g} bytes/s)"
            raise SourceUnavailable(
                f"{self.url} is {reason}; lower data.min_download_rate in params.yaml, or rerun later to resume; "
                f"{_local_copy(self.url)}",
                reason,
            )
        self.started, self.received = time.monotonic(), 0


def _shut(sock: socket.socket) -> None:
    """End `sock` both ways, so that a read blocked on it returns at once (close() alone would not wake it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _opener(clock: _Clock) -> OpenerDirector:
    """urllib's opener, with every connection it makes watched by `clock`."""

    def watched(connection_class: type[http.client.HTTPConnection]) -> Any:
        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            connection = connection_class(*args, **kwargs)
            connection._create_connection = clock.connect  # type: ignore[attr-defined]
            return connection

        return make

    class Http(HTTPHandler):
        def http_open(self, request: Request) -> http.client.HTTPResponse:
            return self.do_open(watched(http.client.HTTPConnection), request)

    class Https(HTTPSHandler):
        def https_open(self, request: Request) -> http.client.HTTPResponse:
            return self.do_open(watched(http.client.HTTPSConnection), request, context=self._context)  # type: ignore[attr-defined]

    return build_opener(Http, Https)


def download(
    url: str,
    partial: Path,
    *,
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    unless: Validators | None = None,
    retry_unreachable: bool = True,
    limits: Limits = Limits(),
) -> Validators | None:
    """Complete `partial` from `url`, retrying transient failures and resuming what was received.

    With `unless`, the request is conditional: None means the server still holds that version
    (304 Not Modified) and sent nothing. Otherwise returns the validators of what was received.
    `retry_unreachable=False` gives up at the first failure to connect, for a caller with a fallback.
    All attempts together end by `limits.deadline_s`; a body slower than `limits.min_rate`, or longer than
    `limits.max_bytes`, ends the download at once (a slow server is kept to resume; an oversized one is not).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    clock = _Clock(url, limits)
    opener = _opener(clock)
    with clock.running():
        for attempt in range(1, attempts + 1):
            try:
                return _download_once(url, partial, timeout_s, unless, clock, opener)
            except _Transient as error:
                failure = error
            if clock.left() <= 0:  # the deadline ended this attempt: say so, not what the cut looked like
                raise clock.out_of_time(_size(partial), str(failure))
            if attempt == attempts or (failure.unreachable and not retry_unreachable):
                break
            pause = backoff_s * 2 ** (attempt - 1)
            if pause >= clock.left():
                raise clock.out_of_time(_size(partial), str(failure))
            time.sleep(pause)
    raise _give_up(url, partial, failure, attempt)


def _download_once(
    url: str, partial: Path, timeout_s: float, unless: Validators | None, clock: _Clock, opener: OpenerDirector
) -> Validators | None:
    """One attempt; network problems become _Transient, permanent ones PipelineError."""
    clock.check(_size(partial))
    # No single wait (to connect, or for the next bytes) may outlast the deadline.
    timeout = max(min(timeout_s, clock.left()), 0.01)
    try:
        response = _open(url, partial, timeout, unless, opener)
        if response is None:
            return Validators()  # the partial already held the whole file; its version is unknown
        with response:
            _receive(url, response, partial, clock)
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
        clock.check(_size(partial), str(error.reason))  # the deadline shut the connection down
        if isinstance(error.reason, ssl.SSLError):
            raise PipelineError(f"TLS error for {url}: {error.reason}") from None
        raise _Transient(str(error.reason), unreachable=True) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
        # Failures after the connection was made: the server went away mid-body or stalled.
        clock.check(_size(partial), type(error).__name__)
        raise _Transient(f"{type(error).__name__}: {error}".rstrip(": ")) from None


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _open(
    url: str, partial: Path, timeout_s: float, unless: Validators | None, opener: OpenerDirector
) -> http.client.HTTPResponse | None:
    """The response for the bytes `partial` lacks, or None if `partial` already holds the whole file."""
    offset = _size(partial)
    try:
        return opener.open(_request(url, offset, unless), timeout=timeout_s)
    except HTTPError as error:
        if error.code != 416 or not offset:
            raise
        total = _content_range(error.headers.get("Content-Range"))[1]
        error.close()
        if total == offset:
            return None
        # The partial is longer than, or unrelated to, what the server holds now: start over.
        partial.unlink()
        return opener.open(_request(url, 0, unless), timeout=timeout_s)


def _request(url: str, offset: int, unless: Validators | None) -> Request:
    headers = {"User-Agent": "dvc-pipeline-fetch"}
    if offset:
        # A resumed download asks for the rest of the file it started, not whether an older one changed.
        headers["Range"] = f"bytes={offset}-"
    elif unless is not None:
        headers.update(unless.conditions())
    plain, authorization = _credentials(url)
    request = Request(plain, headers=headers)
    if authorization:
        # Unredirected: a redirect to another host (a CDN, a storage bucket) must not receive the password.
        request.add_unredirected_header("Authorization", authorization)
    return request


def _credentials(url: str) -> tuple[str, str | None]:
    """`url` without its `user:password@`, and the HTTP Basic authorization they stand for (urllib sends
    neither by itself, and would take them for part of the host name)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return parts._replace(netloc=host).geturl(), f"Basic {token}"


def _receive(url: str, response: http.client.HTTPResponse, partial: Path, clock: _Clock) -> None:
    """Append the response body to `partial` (206), or replace `partial` with it (200), within `clock`'s limits."""
    limits = clock.limits
    offset = _size(partial)
    if response.status == 206 and offset:
        start, whole = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            partial.unlink()
            raise _Transient(f"server sent bytes from {start}, not {offset}; starting over")
        mode = "ab"
    else:
        # A 200 answer is the whole file: the server ignored Range, or there was nothing to resume.
        offset, mode, whole = 0, "wb", None
    length_header = response.headers.get("Content-Length")
    expected = int(length_header) if length_header and length_header.isdigit() else None
    total = offset + expected if expected is not None else None
    announced = whole if whole is not None else total
    if announced is not None and announced > limits.max_bytes:
        # Refused before a byte of the body is read.
        partial.unlink(missing_ok=True)
        raise _too_big(url, f"is {announced:,} bytes (Content-Length),", limits.max_bytes)
    received, first, too_big = 0, b"", False
    head = _head(partial) if offset else b""
    rate = _Rate(url, limits)
    name = PurePosixPath(urlsplit(url).path).name or "download"
    with partial.open(mode) as out, _progress(total, name, initial=offset) as bar:
        try:
            # read1 hands over whatever has arrived, so a timeout loses none of it; read(n) would
            # hold up to n bytes in its buffer and drop them with the exception.
            while chunk := response.read1(CHUNK):
                if len(head) < len(ZIP_MAGIC):
                    head += chunk[: len(ZIP_MAGIC) - len(head)]
                    if len(head) == len(ZIP_MAGIC) and head != ZIP_MAGIC:
                        first = chunk  # with what came before it: what the download looks like
                        break  # not a zip: refused below, after the file is closed
                if offset + received + len(chunk) > limits.max_bytes:
                    too_big = True
                    break  # refused below, with nothing past the limit written
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                rate.add(len(chunk))
                clock.check(offset + received)
        except http.client.IncompleteRead as error:
            out.write(error.partial)
            received += len(error.partial)
            too_big = offset + received > limits.max_bytes
    if len(head) == len(ZIP_MAGIC) and head != ZIP_MAGIC:
        looks = _looks_like(_head(partial, 512) + first)
        partial.unlink(missing_ok=True)
        raise PipelineError(f"{url} is not a zip archive ({looks}); check data.url in params.yaml")
    if too_big:
        partial.unlink(missing_ok=True)
        raise _too_big(url, "sent", limits.max_bytes)
    clock.check(offset + received)  # a body ended by the deadline's shutdown is not complete
    # http.client returns a short body without complaint when the server closes early.
    if expected is not None and received < expected:
        raise _Transient(f"connection closed after {offset + received} of {total} bytes")


def _head(path: Path, size: int = len(ZIP_MAGIC)) -> bytes:
    """The first bytes of `path` (of a partial being resumed: its start was checked when it was received)."""
    with path.open("rb") as file:
        return file.read(size)


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes 100-199/200` or `bytes */200`; None where unknown."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _status_text(code: int, reason: object) -> str:
    return f"HTTP {code} {reason}".rstrip()


def _local_copy(url: str) -> str:
    file_name = PurePosixPath(urlsplit(url).path).name or "dataset.zip"
    return f"download it elsewhere and set data.url in params.yaml to file:///path/to/{file_name} or a local path"


def _give_up(url: str, partial: Path, failure: _Transient, attempts: int) -> SourceUnavailable:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if failure.unreachable:
        host = urlsplit(url).hostname
        reason = f"host {host} cannot be reached: {failure}"
        return SourceUnavailable(f"host {host} cannot be reached for {url} ({failure}); {_local_copy(url)}", reason)
    kept = partial.exists() and partial.stat().st_size > 0
    resume = "; rerun to resume the partial download" if kept else ""
    message = f"{failure} for {url} after {tries}{resume}; try again later, or {_local_copy(url)}"
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
