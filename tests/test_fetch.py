"""Tests of the `fetch` stage against a real HTTP server on 127.0.0.1 and local files."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))  # `pytest` alone (unlike `python -m pytest`) skips the cwd

from tlpipe import download as fetch_module  # noqa: E402
from tlpipe.download import (  # noqa: E402
    Limits,
    Source,
    fetch,
    pack_directory,
    partial_path,
    read_record,
    redacted,
    scrubbed,
    write_record,
)
from tlpipe.errors import PipelineError  # noqa: E402


def zip_bytes(body: bytes, name: str = "train/cats/cat.1.jpg") -> bytes:
    """A one-entry zip holding `body` uncompressed, the same bytes every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), body)
    return buffer.getvalue()


BODY = bytes(range(256)) * 400 + b"tail"  # 102 404 bytes, not a multiple of anything convenient
DATA = zip_bytes(BODY)  # fetch accepts only a readable zip
OTHER = zip_bytes(BODY[::-1])  # another version of the dataset
HALF = len(DATA) // 2
FAST = {"attempts": 3, "backoff_s": 0.01, "timeout_s": 5}

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class Server:
    """A local HTTP server whose GET behaviour each test sets, recording every request's headers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.handle: Handler = lambda request: send(request, DATA)
        self.port = 0

    def url(self, path: str = "/cats_and_dogs_filtered.zip") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ranges(self) -> list[str | None]:
        return [headers.get("Range") for headers in self.requests]


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class RequestHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(dict(self.headers.items()))
            state.handle(self)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {"target": tmp_path / "data" / "raw" / "dataset.zip", "partial_dir": tmp_path / "downloads"}


def send(request: http.server.BaseHTTPRequestHandler, body: bytes, status: int = 200, **headers: str) -> None:
    request.send_response(status)
    request.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        request.send_header(name.replace("_", "-"), value)
    request.end_headers()
    request.wfile.write(body)


def send_ranged(request: http.server.BaseHTTPRequestHandler, data: bytes = DATA) -> None:
    """Serve `data`, honouring `Range: bytes=N-` the way a real server does."""
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
    if not match:
        send(request, data)
        return
    start = int(match.group(1))
    if start >= len(data):
        send(request, b"", 416, Content_Range=f"bytes */{len(data)}")
        return
    send(request, data[start:], 206, Content_Range=f"bytes {start}-{len(data) - 1}/{len(data)}")


def send_half_then_hang_up(request: http.server.BaseHTTPRequestHandler) -> None:
    """Promise the whole file, send half, close the connection."""
    request.send_response(200)
    request.send_header("Content-Length", str(len(DATA)))
    request.end_headers()
    request.wfile.write(DATA[:HALF])
    request.wfile.flush()
    request.close_connection = True


def run_fetch(server: Server, paths: dict[str, Path], sha256: str | None = None, **options: object) -> Path:
    return fetch(server.url(), paths["target"], sha256, partial_dir=paths["partial_dir"], **{**FAST, **options})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_one_line(error: pytest.ExceptionInfo[PipelineError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- HTTP ----------------------------------------------------------------------------------------


def test_download_with_matching_sha256(server: Server, paths: dict[str, Path]) -> None:
    result = run_fetch(server, paths, sha(DATA).upper())  # params allow upper-case hex
    assert result == paths["target"]
    assert result.read_bytes() == DATA
    assert server.ranges() == [None]
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


def test_sha256_mismatch_deletes_the_download(server: Server, paths: dict[str, Path]) -> None:
    wrong = "0" * 64
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, wrong)
    message = assert_one_line(error)
    assert wrong in message and sha(DATA) in message
    assert not paths["target"].exists()
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


def test_404_is_one_line_and_not_retried(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send(request, b"nope", 404)
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths)
    message = assert_one_line(error)
    assert "404" in message and server.url() in message and "data.url" in message
    assert len(server.requests) == 1
    assert not paths["target"].exists()


def test_500_twice_then_success_is_retried_with_backoff(
    server: Server, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(fetch_module.time, "sleep", sleeps.append)
    server.handle = lambda request: send(request, b"oops", 500) if len(server.requests) <= 2 else send(request, DATA)
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert len(server.requests) == 3
    assert sleeps == pytest.approx([0.01, 0.02])


def test_500_forever_fails_after_all_attempts(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send(request, b"oops", 500)
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, attempts=4)
    message = assert_one_line(error)
    assert "500" in message and server.url() in message and "4 attempts" in message
    assert len(server.requests) == 4
    assert not paths["target"].exists()


def test_interrupted_download_resumes_with_range(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: (
        send_half_then_hang_up(request) if len(server.requests) == 1 else send_ranged(request)
    )
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == [None, f"bytes={HALF}-"]


def test_stalled_download_times_out_and_resumes(server: Server, paths: dict[str, Path]) -> None:
    def stall_then_serve(request: http.server.BaseHTTPRequestHandler) -> None:
        if len(server.requests) > 1:
            send_ranged(request)
            return
        request.send_response(200)
        request.send_header("Content-Length", str(len(DATA)))
        request.end_headers()
        request.wfile.write(DATA[:HALF])
        time.sleep(0.6)  # longer than the client's timeout

    server.handle = stall_then_serve
    assert run_fetch(server, paths, timeout_s=0.2).read_bytes() == DATA
    assert server.ranges() == [None, f"bytes={HALF}-"]


def test_partial_from_an_earlier_run_is_resumed(server: Server, paths: dict[str, Path]) -> None:
    partial = partial_path(server.url(), paths["partial_dir"])
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA[:HALF])
    server.handle = send_ranged
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == [f"bytes={HALF}-"]
    assert not partial.exists()


def test_failed_run_keeps_the_partial_for_the_next_run(server: Server, paths: dict[str, Path]) -> None:
    server.handle = send_half_then_hang_up
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, attempts=1)
    assert "resume" in assert_one_line(error) and server.url() in str(error.value)
    partial = partial_path(server.url(), paths["partial_dir"])
    assert partial.read_bytes() == DATA[:HALF]
    assert not paths["target"].exists()
    server.handle = send_ranged
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == [None, f"bytes={HALF}-"]


def test_server_ignoring_range_starts_over(server: Server, paths: dict[str, Path]) -> None:
    partial = partial_path(server.url(), paths["partial_dir"])
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)  # would corrupt the result if appended to
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == ["bytes=1000-"]


def test_416_with_a_complete_partial_needs_no_more_bytes(server: Server, paths: dict[str, Path]) -> None:
    partial = partial_path(server.url(), paths["partial_dir"])
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA)
    server.handle = send_ranged
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == [f"bytes={len(DATA)}-"]


def test_416_with_an_oversized_partial_starts_over(server: Server, paths: dict[str, Path]) -> None:
    partial = partial_path(server.url(), paths["partial_dir"])
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA + b"garbage")
    server.handle = send_ranged
    assert run_fetch(server, paths, sha(DATA)).read_bytes() == DATA
    assert server.ranges() == [f"bytes={len(DATA) + 7}-", None]


def test_connection_refused_says_host_cannot_be_reached(paths: dict[str, Path]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip"
    with pytest.raises(PipelineError) as error:
        fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **{**FAST, "attempts": 2})
    message = assert_one_line(error)
    assert "cannot be reached" in message and url in message
    assert "data.url" in message and "file:///path/to/cats_and_dogs_filtered.zip" in message
    assert not paths["target"].exists()


# --- local sources -------------------------------------------------------------------------------


@pytest.fixture
def source_zip(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "my data.zip"  # a space, to exercise file:// quoting
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


def test_file_url_is_copied(source_zip: Path, paths: dict[str, Path]) -> None:
    assert "%20" in source_zip.as_uri()
    result = fetch(source_zip.as_uri(), paths["target"], sha(DATA), partial_dir=paths["partial_dir"])
    assert result.read_bytes() == DATA


def test_plain_relative_and_absolute_paths_are_copied(
    source_zip: Path, paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert fetch("source/my data.zip", paths["target"], None).read_bytes() == DATA
    paths["target"].unlink()
    assert fetch(str(source_zip), paths["target"], None).read_bytes() == DATA
    assert not (tmp_path / "data" / ".downloads").exists()  # local copies never use a partial


def test_local_sha256_mismatch_leaves_no_output(source_zip: Path, paths: dict[str, Path]) -> None:
    with pytest.raises(PipelineError) as error:
        fetch(str(source_zip), paths["target"], "f" * 64)
    assert "f" * 64 in assert_one_line(error) and sha(DATA) in str(error.value)
    assert list(paths["target"].parent.iterdir()) == []


def test_missing_local_file_is_one_line(tmp_path: Path, paths: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere.zip"
    with pytest.raises(PipelineError) as error:
        fetch(missing.as_uri(), paths["target"], None)
    message = assert_one_line(error)
    assert missing.as_uri() in message and "data.url" in message


def test_unsupported_scheme_is_one_line(paths: dict[str, Path]) -> None:
    with pytest.raises(PipelineError) as error:
        fetch("ftp://example.com/x.zip", paths["target"], None)
    assert "ftp://" in assert_one_line(error)


def make_image_folder(root: Path) -> None:
    files = {
        "train/cats/cat.1.jpg": b"cat one",
        "train/cats/cat.2.jpg": b"cat two",
        "train/dogs/dog.1.jpg": b"dog",
        "validation/cats/cat.3.jpg": b"cat three",
        "validation/dogs/dog.2.jpg": b"dog two",
        ".DS_Store": b"mac",
        "train/.DS_Store": b"mac",
        "train/cats/._cat.1.jpg": b"resource fork",
        "__MACOSX/train/cats/._cat.1.jpg": b"resource fork",
        ".git/config": b"vcs",
    }
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    (root / "validation" / "empty").mkdir()


def test_a_class_folder_named_with_dots_only_is_packed_and_hidden_files_are_not(tmp_path: Path) -> None:
    """fetch and prepare share one rule for hidden names (tlpipe.files.is_hidden): a class folder `...` packed
    from a local folder reaches prepare, as it does from a zip, while dotfiles stay out."""
    folder = tmp_path / "images"
    for name in ("cats/cat.1.jpg", ".../odd.1.jpg", ".../.hidden.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"pixels")
    with zipfile.ZipFile(fetch(str(folder), tmp_path / "packed.zip", None)) as archive:
        assert archive.namelist() == [".../odd.1.jpg", "cats/cat.1.jpg"]


def test_folder_is_packed_deterministically(tmp_path: Path, paths: dict[str, Path]) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    first = fetch(str(folder), tmp_path / "first.zip", None)
    # Different timestamps on disk must not change the archive.
    for path in folder.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    second = fetch(folder.as_uri(), tmp_path / "second.zip", None)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
        assert [info.filename for info in infos] == [
            "train/cats/cat.1.jpg",
            "train/cats/cat.2.jpg",
            "train/dogs/dog.1.jpg",
            "validation/cats/cat.3.jpg",
            "validation/dogs/dog.2.jpg",
        ]
        assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}
        assert archive.read("validation/cats/cat.3.jpg") == b"cat three"


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images" / "__MACOSX").mkdir(parents=True)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"mac")
    with pytest.raises(PipelineError) as error:
        pack_directory(tmp_path / "images", tmp_path / "out.zip")
    assert "no files" in assert_one_line(error)


# --- changed and unchanged sources ---------------------------------------------------------------
#
# DVC runs fetch on every `dvc repro` (always_changed); the archive must be rewritten exactly when the
# source changed, since an archive with a new mtime but the same bytes is harmless to DVC, but one
# left stale hides the change from every later stage.

OLD = 1_600_000_000  # an mtime no fetch today could produce, so any rewrite of the archive shows


def backdate(path: Path) -> int:
    os.utime(path, (OLD, OLD))
    return path.stat().st_mtime_ns


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The last line written to stderr since the last call (reading it empties the capture)."""
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_unchanged_folder_leaves_the_archive_untouched(
    tmp_path: Path, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    fetch(str(folder), paths["target"], None)
    before = paths["target"].read_bytes()
    mtime = backdate(paths["target"])
    record = paths["target"].with_name("source.json").read_bytes()
    for path in folder.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))  # touched, not changed
    capsys.readouterr()
    fetch(str(folder), paths["target"], None)
    assert paths["target"].read_bytes() == before
    assert paths["target"].stat().st_mtime_ns == mtime
    assert paths["target"].with_name("source.json").read_bytes() == record
    assert sorted(p.name for p in paths["target"].parent.iterdir()) == ["dataset.zip", "source.json"]
    assert last_line(capsys).startswith("fetch: unchanged:")


@pytest.mark.parametrize("change", ["add", "remove", "edit", "rename"])
def test_changed_folder_replaces_the_archive(
    tmp_path: Path, paths: dict[str, Path], capsys: pytest.CaptureFixture[str], change: str
) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    fetch(str(folder), paths["target"], None)
    before = paths["target"].read_bytes()
    backdate(paths["target"])
    cat = folder / "train" / "cats" / "cat.2.jpg"
    if change == "add":
        (folder / "train" / "dogs" / "dog.9.jpg").write_bytes(b"new dog")
    elif change == "remove":
        shutil.rmtree(folder / "validation" / "dogs")
    elif change == "edit":
        cat.write_bytes(b"cat TWO")  # same size, other bytes
    else:
        cat.rename(cat.with_name("cat.20.jpg"))
    capsys.readouterr()
    fetch(str(folder), paths["target"], None)
    assert paths["target"].read_bytes() != before
    assert paths["target"].stat().st_mtime_ns != OLD * 10**9
    assert last_line(capsys).startswith("fetch: updated:")
    fresh = tmp_path / "fresh.zip"
    pack_directory(folder, fresh)
    assert paths["target"].read_bytes() == fresh.read_bytes()  # exactly what the folder holds now
    record = read_record(paths["target"].with_name("source.json"))
    assert record == Source(str(folder), sha(fresh.read_bytes()), fresh.stat().st_size)
    assert sorted(p.name for p in paths["target"].parent.iterdir()) == ["dataset.zip", "source.json"]


def test_local_zip_is_copied_only_when_it_changed(
    source_zip: Path, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fetch(str(source_zip), paths["target"], None)
    mtime = backdate(paths["target"])
    capsys.readouterr()
    fetch(str(source_zip), paths["target"], None)
    assert paths["target"].stat().st_mtime_ns == mtime
    assert last_line(capsys).startswith("fetch: unchanged:")
    source_zip.write_bytes(OTHER)
    fetch(str(source_zip), paths["target"], None)
    assert paths["target"].read_bytes() == OTHER
    assert last_line(capsys).startswith("fetch: updated:")


def test_an_unchanged_local_zip_is_neither_copied_nor_hashed_again(
    source_zip: Path, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same size and modification time as recorded: taken as unchanged without reading it. A touched file
    (same bytes, new time) is read and found unchanged; a rewritten one of the same size is copied."""
    from tlpipe import download

    fetch(str(source_zip), paths["target"], None)
    copies = []
    real_copy = download._copy_with_progress
    monkeypatch.setattr(download, "_copy_with_progress", lambda *args: (copies.append(args), real_copy(*args)))
    capsys.readouterr()
    fetch(str(source_zip), paths["target"], None)
    assert copies == [] and "has the size and modification time it had" in last_line(capsys)
    os.utime(source_zip, ns=(OLD * 10**9, OLD * 10**9))
    fetch(str(source_zip), paths["target"], None)
    assert len(copies) == 1 and "holds the same data" in last_line(capsys)
    fetch(str(source_zip), paths["target"], None)
    assert len(copies) == 1  # the new time was recorded
    source_zip.write_bytes(OTHER)
    fetch(str(source_zip), paths["target"], None)
    assert len(copies) == 2 and paths["target"].read_bytes() == OTHER
    assert last_line(capsys).startswith("fetch: updated:")


def test_changed_folder_with_a_pinned_sha256_keeps_the_old_archive(tmp_path: Path, paths: dict[str, Path]) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    fetch(str(folder), paths["target"], None)
    pinned = sha(paths["target"].read_bytes())
    fetch(str(folder), paths["target"], pinned)  # unchanged and matching: fine
    before = paths["target"].read_bytes()
    (folder / "train" / "dogs" / "dog.9.jpg").write_bytes(b"new dog")
    with pytest.raises(PipelineError) as error:
        fetch(str(folder), paths["target"], pinned)
    assert pinned in assert_one_line(error)
    assert paths["target"].read_bytes() == before


def send_versioned(request: http.server.BaseHTTPRequestHandler, body: bytes, etag: str, modified: str) -> None:
    """Serve `body` as version `etag`, answering 304 to a conditional GET for that same version."""
    if request.headers.get("If-None-Match") == etag:
        request.send_response(304)
        request.send_header("ETag", etag)
        request.end_headers()
        return
    send(request, body, ETag=etag, Last_Modified=modified)


MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


def test_conditional_get_keeps_an_unchanged_download(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    record_path = paths["target"].with_name("source.json")
    record = json.loads(record_path.read_text())
    # Only what identifies the data, nothing about when it was checked, so dvc.lock does not churn.
    assert record == {
        "url": server.url(),
        "sha256": sha(DATA),
        "size": len(DATA),
        "etag": '"v1"',
        "last_modified": MODIFIED,
    }
    mtime = backdate(paths["target"])
    capsys.readouterr()
    assert run_fetch(server, paths).read_bytes() == DATA
    assert paths["target"].stat().st_mtime_ns == mtime
    assert json.loads(record_path.read_text()) == record
    second = server.requests[1]
    assert second.get("If-None-Match") == '"v1"' and second.get("If-Modified-Since") == MODIFIED
    assert "Range" not in second
    line = last_line(capsys)
    assert line.startswith("fetch: unchanged:") and "304" in line
    assert not paths["partial_dir"].exists()


def test_changed_etag_downloads_again(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    new = OTHER
    server.handle = lambda request: send_versioned(request, new, '"v2"', "Thu, 22 Oct 2015 07:28:00 GMT")
    capsys.readouterr()
    assert run_fetch(server, paths).read_bytes() == new
    assert server.requests[1].get("If-None-Match") == '"v1"'
    assert last_line(capsys).startswith("fetch: updated:")
    record = read_record(paths["target"].with_name("source.json"))
    assert record is not None and record.etag == '"v2"' and record.sha256 == sha(new)
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


def test_new_etag_with_the_same_bytes_leaves_the_archive_untouched(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    mtime = backdate(paths["target"])
    server.handle = lambda request: send_versioned(request, DATA, '"v2"', MODIFIED)  # e.g. re-uploaded
    capsys.readouterr()
    run_fetch(server, paths)
    assert paths["target"].stat().st_mtime_ns == mtime
    assert last_line(capsys).startswith("fetch: unchanged:")
    assert read_record(paths["target"].with_name("source.json")).etag == '"v2"'  # the next check asks for v2
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


def test_a_changed_url_downloads_anew(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    other = server.url("/mirror/cats_and_dogs_filtered.zip")
    fetch(other, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    assert "If-None-Match" not in server.requests[1] and "If-Modified-Since" not in server.requests[1]
    assert read_record(paths["target"].with_name("source.json")).url == other


def test_damaged_archive_is_downloaded_without_conditions(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    paths["target"].write_bytes(DATA[:HALF])  # no longer what source.json says was downloaded
    assert run_fetch(server, paths).read_bytes() == DATA
    assert "If-None-Match" not in server.requests[1]


def test_pinned_sha256_matching_the_archive_makes_no_request(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths, sha(DATA))
    mtime = backdate(paths["target"])
    capsys.readouterr()
    run_fetch(server, paths, sha(DATA))
    assert len(server.requests) == 1
    assert paths["target"].stat().st_mtime_ns == mtime
    line = last_line(capsys)
    assert line.startswith("fetch: unchanged:") and "not contacted" in line
    assert read_record(paths["target"].with_name("source.json")).etag == '"v1"'


def test_pinned_sha256_missing_the_archive_asks_unconditionally(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    # A 304 to a conditional GET would keep an archive that is not the pinned one.
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, sha(OTHER))
    assert "sha256 mismatch" in assert_one_line(error)
    assert "If-None-Match" not in server.requests[1]
    assert paths["target"].read_bytes() == DATA  # the mismatching download never replaced it


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip"


def test_unreachable_server_keeps_the_earlier_download_with_a_warning(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(fetch_module.time, "sleep", sleeps.append)
    url = closed_port_url()
    paths["target"].parent.mkdir(parents=True)
    paths["target"].write_bytes(DATA)
    mtime = backdate(paths["target"])
    write_record(paths["target"].with_name("source.json"), Source(url, sha(DATA), len(DATA), '"v1"', MODIFIED))
    fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    assert paths["target"].stat().st_mtime_ns == mtime
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), lines
    assert url in lines[0] and "data/raw/dataset.zip" in lines[0] and "cannot be reached" in lines[0]
    assert sleeps == []  # with a copy to fall back on, an outage is not waited out


def test_unreachable_server_with_an_archive_from_another_url_is_an_error(paths: dict[str, Path]) -> None:
    url = closed_port_url()
    paths["target"].parent.mkdir(parents=True)
    paths["target"].write_bytes(DATA)
    write_record(paths["target"].with_name("source.json"), Source("http://elsewhere/x.zip", sha(DATA), len(DATA)))
    with pytest.raises(PipelineError) as error:
        fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **{**FAST, "backoff_s": 0})
    assert "cannot be reached" in assert_one_line(error) and url in str(error.value)


def test_failing_server_keeps_the_earlier_download_but_a_404_is_an_error(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    run_fetch(server, paths)
    server.handle = lambda request: send(request, b"oops", 503)
    capsys.readouterr()
    assert run_fetch(server, paths).read_bytes() == DATA
    assert len(server.requests) == 1 + FAST["attempts"]  # reachable, so retried as before
    line = last_line(capsys)
    assert line.startswith("warning: ") and "503" in line and server.url() in line
    server.handle = lambda request: send(request, b"gone", 404)
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths)
    assert "404" in assert_one_line(error)
    assert paths["target"].read_bytes() == DATA


# --- the stage as DVC runs it --------------------------------------------------------------------


def run_stage(workdir: Path, url: str, params: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    params = params or yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["url"] = url
    params["data"]["sha256"] = None
    (workdir / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stages.fetch"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stage_writes_the_raw_archive(tmp_path: Path) -> None:
    source = tmp_path / "tiny.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("train/cats/cat.1.jpg", b"cat")
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = run_stage(workdir, source.as_uri())
    assert result.returncode == 0, result.stderr
    archive = workdir / "data" / "raw" / "dataset.zip"
    assert archive.read_bytes() == source.read_bytes()
    assert sha(source.read_bytes()) in result.stdout
    assert read_record(workdir / "data" / "raw" / "source.json") == Source(
        source.as_uri(), sha(source.read_bytes()), source.stat().st_size, mtime_ns=source.stat().st_mtime_ns
    )
    mtime = backdate(archive)
    again = run_stage(workdir, source.as_uri())
    assert again.returncode == 0, again.stderr
    assert archive.stat().st_mtime_ns == mtime
    assert again.stderr.strip().splitlines()[-1].startswith("fetch: unchanged:")
    assert sha(source.read_bytes()) in again.stdout


def test_stage_with_a_bad_url_prints_one_error_line(tmp_path: Path) -> None:
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = run_stage(workdir, (tmp_path / "missing.zip").as_uri())
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "missing.zip" in lines[0]
    assert not (workdir / "data" / "raw" / "dataset.zip").exists()


# --- bounds: time, rate, bytes, and only a zip replaces the archive --------------------------------
#
# Each test passes tiny limits as arguments, so that a bound is hit in well under a second.


def with_previous_archive(server: Server, paths: dict[str, Path], *, same_url: bool = False) -> tuple[bytes, bytes]:
    """A first, good download; returns the archive's and source.json's bytes, which a failed fetch must keep.

    From another URL unless `same_url`: then a failure to check the server falls back on it, with a warning.
    """
    url = server.url() if same_url else server.url("/earlier/cats_and_dogs_filtered.zip")
    fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    return paths["target"].read_bytes(), paths["target"].with_name("source.json").read_bytes()


def assert_kept(paths: dict[str, Path], before: tuple[bytes, bytes], message: str) -> None:
    assert (paths["target"].read_bytes(), paths["target"].with_name("source.json").read_bytes()) == before
    assert message.endswith(f"; kept the previous {paths['target']}")


def trickle(request: http.server.BaseHTTPRequestHandler, interval_s: float, limit: int = 400) -> None:
    """A zip's first bytes, then one byte every `interval_s` (at most `limit`), without a Content-Length."""
    request.send_response(200)
    request.end_headers()
    try:
        request.wfile.write(DATA[:2])
        for byte in DATA[2:limit]:
            request.wfile.write(bytes([byte]))
            request.wfile.flush()
            time.sleep(interval_s)
    except OSError:
        pass  # the client gave up, as it should


def stream(
    request: http.server.BaseHTTPRequestHandler,
    first: bytes,
    total: int,
    length: str | None = None,
    sent: list[int] | None = None,
) -> None:
    """`first`, then zeros up to `total` bytes, quickly; with `length` as the Content-Length if given. Appends
    to `sent` how many bytes the client took before it hung up."""
    request.send_response(200)
    if length is not None:
        request.send_header("Content-Length", length)
    request.end_headers()
    block, done = bytes(64 * 1024), 0
    try:
        request.wfile.write(first)
        done = len(first)
        while done < total:
            done += request.wfile.write(block[: total - done])
    except OSError:
        pass  # the client hung up
    if sent is not None:
        sent.append(done)


def test_a_slow_server_is_given_up_on_naming_min_download_rate(server: Server, paths: dict[str, Path]) -> None:
    before = with_previous_archive(server, paths)
    server.handle = lambda request: trickle(request, 0.05)  # about 20 bytes/s
    started = time.monotonic()
    limits = Limits(min_rate=1000, rate_window_s=0.5)
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, limits=limits)
    elapsed = time.monotonic() - started
    message = assert_one_line(error)
    assert "data.min_download_rate" in message and server.url() in message
    assert elapsed < 5, f"gave up after {elapsed:.1f} s, not about the 0.5 s window"
    assert len(server.requests) == 2  # given up at once, not retried
    assert_kept(paths, before, message)
    assert partial_path(server.url(), paths["partial_dir"]).stat().st_size > 2  # kept, for a rerun to resume


def test_the_deadline_ends_a_download_that_keeps_its_rate(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: trickle(request, 0.02)
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, limits=Limits(deadline_s=0.5, min_rate=0))
    elapsed = time.monotonic() - started
    message = assert_one_line(error)
    assert "data.download_deadline" in message and "raise data.download_deadline" in message
    assert 0.5 <= elapsed < 3, elapsed
    assert not paths["target"].exists()


def test_the_deadline_covers_every_retry(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send(request, b"oops", 503)
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, attempts=50, backoff_s=0.2, limits=Limits(deadline_s=0.5))
    elapsed = time.monotonic() - started
    message = assert_one_line(error)
    assert "data.download_deadline" in message and "503" in message
    assert elapsed < 2 and len(server.requests) < 5, (elapsed, len(server.requests))


def test_a_silent_server_cannot_outlast_the_deadline(server: Server, paths: dict[str, Path]) -> None:
    def silent(request: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(2)

    server.handle = silent
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, timeout_s=30, limits=Limits(deadline_s=0.5))
    assert "data.download_deadline" in assert_one_line(error)
    assert time.monotonic() - started < 1.5  # the 30 s per-read timeout was cut to what the deadline left


def test_a_server_trickling_its_headers_cannot_outlast_the_deadline(server: Server, paths: dict[str, Path]) -> None:
    """A read timeout bounds one wait only; the deadline shuts the connection down wherever it waits."""

    def trickle_headers(request: http.server.BaseHTTPRequestHandler) -> None:
        try:
            request.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(200):
                request.wfile.write(b"x")
                request.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    server.handle = trickle_headers
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, limits=Limits(deadline_s=0.5))
    assert "data.download_deadline" in assert_one_line(error)
    assert time.monotonic() - started < 2  # the server would go on for 10 s


def trickle_tls_record(listener: socket.socket) -> None:
    """Take a TLS hello, then announce a 16 KiB handshake record and send it one byte every 0.05 s."""
    connection = listener.accept()[0]
    with connection:
        try:
            connection.recv(4096)
            connection.sendall(b"\x16\x03\x03\x40\x00")
            for _ in range(200):
                connection.sendall(b"\x00")
                time.sleep(0.05)
        except OSError:
            pass


def test_a_trickled_tls_handshake_cannot_outlast_the_deadline(paths: dict[str, Path]) -> None:
    """An https:// server whose handshake never ends (each byte well within the 30 s read timeout): the wait
    for it is cut to what the deadline leaves, and the https:// opener keeps the connection watched."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=trickle_tls_record, args=(listener,), daemon=True).start()
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/cats_and_dogs_filtered.zip"
        started = time.monotonic()
        with pytest.raises(PipelineError) as error:
            fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], limits=Limits(deadline_s=0.5))
    assert "data.download_deadline" in assert_one_line(error) and url in str(error.value)
    assert time.monotonic() - started < 2  # the server would go on for 10 s


def test_a_length_over_the_cap_is_refused_before_the_body(server: Server, paths: dict[str, Path]) -> None:
    before = with_previous_archive(server, paths)
    server.handle = lambda request: stream(request, DATA[:2], 10 * 2**20, length=str(10**12))
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, limits=Limits(max_bytes=2**20))
    message = assert_one_line(error)
    assert "1,000,000,000,000 bytes" in message and "data.max_download_bytes (1,048,576 bytes)" in message
    assert_kept(paths, before, message)
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


@pytest.mark.parametrize("size", [64 * 2**20, 2**20 + 1])  # far over the cap; one byte over it
def test_a_stream_without_length_stops_at_the_cap(server: Server, paths: dict[str, Path], size: int) -> None:
    before = with_previous_archive(server, paths)
    server.handle = lambda request: stream(request, DATA[:2], size)  # no Content-Length
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, limits=Limits(max_bytes=2**20))
    message = assert_one_line(error)
    assert "sent more than data.max_download_bytes (1,048,576 bytes)" in message
    assert_kept(paths, before, message)
    assert not partial_path(server.url(), paths["partial_dir"]).exists()


def test_a_stream_exactly_at_the_cap_is_accepted(server: Server, paths: dict[str, Path]) -> None:
    server.handle = lambda request: send(request, DATA)
    assert run_fetch(server, paths, limits=Limits(max_bytes=len(DATA))).read_bytes() == DATA


def test_bytes_that_do_not_start_like_a_zip_are_refused_at_once(server: Server, paths: dict[str, Path]) -> None:
    sent: list[int] = []
    server.handle = lambda request: stream(request, b"\0\0", 256 * 2**20, sent=sent)  # 256 MiB of zeros
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths)
    message = assert_one_line(error)
    assert "is not a zip archive (its first bytes are not a zip's)" in message and "data.url" in message
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)  # the server thread notices the hang-up at its next write
    assert sent and sent[0] < 64 * 2**20, sent  # the client stopped reading at once (the rest: socket buffers)
    assert not paths["target"].exists() and not partial_path(server.url(), paths["partial_dir"]).exists()


@pytest.mark.parametrize(
    ("body", "looks"),
    [
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
        (b"PK but not a zip after all" * 100, "do not start or end like a zip"),
        (DATA[: len(DATA) - 30], "do not start or end like a zip"),  # a zip cut short: no central directory
        (b"", "empty"),
    ],
)
def test_a_download_that_is_not_a_zip_keeps_the_previous_archive(
    server: Server, paths: dict[str, Path], body: bytes, looks: str
) -> None:
    before = with_previous_archive(server, paths)
    server.handle = lambda request: send(request, body)
    with pytest.raises(PipelineError) as error:
        run_fetch(server, paths, sha256=None)
    message = assert_one_line(error)
    assert "is not a zip archive" in message and looks in message
    assert_kept(paths, before, message)
    assert not partial_path(server.url(), paths["partial_dir"]).exists()  # bad bytes are never resumed


def test_a_slow_server_with_an_earlier_download_warns_naming_the_parameter(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Like an outage: the archive downloaded earlier from the same URL is used, with one warning line."""
    before = with_previous_archive(server, paths, same_url=True)
    server.handle = lambda request: trickle(request, 0.05)
    capsys.readouterr()
    run_fetch(server, paths, limits=Limits(min_rate=1000, rate_window_s=0.3))
    line = last_line(capsys)
    assert line.startswith("warning: ") and "data.min_download_rate" in line
    assert (paths["target"].read_bytes(), paths["target"].with_name("source.json").read_bytes()) == before


def test_a_local_file_that_is_not_a_zip_is_refused(tmp_path: Path, paths: dict[str, Path], source_zip: Path) -> None:
    fetch(str(source_zip), paths["target"], None)
    before = (paths["target"].read_bytes(), paths["target"].with_name("source.json").read_bytes())
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(PipelineError) as error:
        fetch(str(passwd), paths["target"], None)
    message = assert_one_line(error)
    assert "is not a zip archive" in message and "root:x" not in message  # named, never quoted
    assert_kept(paths, before, message)
    assert sorted(p.name for p in paths["target"].parent.iterdir()) == ["dataset.zip", "source.json"]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_a_device_is_refused(paths: dict[str, Path]) -> None:
    with pytest.raises(PipelineError) as error:
        fetch("/dev/zero", paths["target"], None)
    assert "neither a regular file nor a folder" in assert_one_line(error)


def test_a_local_zip_or_folder_over_the_cap_is_refused(
    tmp_path: Path, paths: dict[str, Path], source_zip: Path
) -> None:
    with pytest.raises(PipelineError) as error:
        fetch(str(source_zip), paths["target"], None, limits=Limits(max_bytes=1000))
    assert "data.max_download_bytes (1,000 bytes)" in assert_one_line(error)
    folder = tmp_path / "images"
    make_image_folder(folder)
    with pytest.raises(PipelineError) as error:
        fetch(str(folder), paths["target"], None, limits=Limits(max_bytes=10))
    assert "data.max_download_bytes (10)" in assert_one_line(error)
    assert not paths["target"].exists()


# --- symbolic links in a local folder --------------------------------------------------------------
#
# Refused when they lead outside the folder (or into a loop), packed under their own name when they lead
# to a file or folder inside it.


def test_a_link_to_a_file_outside_the_folder_is_refused(tmp_path: Path, paths: dict[str, Path]) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    fetch(str(folder), paths["target"], None)
    before = (paths["target"].read_bytes(), paths["target"].with_name("source.json").read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    link = folder / "train" / "cats" / "secret.jpg"
    link.symlink_to(secret)
    with pytest.raises(PipelineError) as error:
        fetch(str(folder), paths["target"], None)
    message = assert_one_line(error)
    assert str(link) in message and str(secret) in message and "outside" in message
    assert_kept(paths, before, message)
    with zipfile.ZipFile(paths["target"]) as archive:
        assert "train/cats/secret.jpg" not in archive.namelist()


def test_a_linked_folder_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    elsewhere = tmp_path / "home"
    (elsewhere / "ssh").mkdir(parents=True)
    (elsewhere / "ssh" / "id_rsa").write_bytes(b"key")
    (folder / "train" / "birds").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PipelineError) as error:
        pack_directory(folder, tmp_path / "out.zip")
    assert str(folder / "train" / "birds") in assert_one_line(error) and "outside" in str(error.value)


def test_links_inside_the_folder_are_packed_under_their_own_names(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    (folder / "train" / "cats" / "alias.jpg").symlink_to(folder / "validation" / "cats" / "cat.3.jpg")
    (folder / "train" / "dogs" / "relative.jpg").symlink_to(Path("dog.1.jpg"))  # relative, same folder
    (folder / "validation" / "birds").symlink_to(Path("..") / "train" / "dogs", target_is_directory=True)
    pack_directory(folder, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert archive.read("train/cats/alias.jpg") == b"cat three"
        assert archive.read("train/dogs/relative.jpg") == b"dog"
        assert archive.read("validation/birds/dog.1.jpg") == b"dog"


def test_a_link_to_a_folder_containing_it_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    (folder / "train" / "cats" / "again").symlink_to(folder / "train", target_is_directory=True)
    with pytest.raises(PipelineError) as error:
        pack_directory(folder, tmp_path / "out.zip")
    assert "contains it" in assert_one_line(error)


def test_a_folder_given_through_a_link_is_packed(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_image_folder(folder)
    (tmp_path / "shortcut").symlink_to(folder, target_is_directory=True)
    pack_directory(tmp_path / "shortcut", tmp_path / "via_link.zip")
    pack_directory(folder, tmp_path / "direct.zip")
    assert (tmp_path / "via_link.zip").read_bytes() == (tmp_path / "direct.zip").read_bytes()


# --- secrets in data.url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@host/d.zip", "http://user:***@host/d.zip"),
        ("https://ghp_token123@github.com/o/r/d.zip", "https://***@github.com/o/r/d.zip"),
        ("https://u:p%40ss@h:8443/d.zip?x=1", "https://u:***@h:8443/d.zip?x=1"),
        ("https://h/d.zip?token=abc&v=2", "https://h/d.zip?token=***&v=2"),
        (
            "https://b.s3.amazonaws.com/d.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=0123abcd&X-Amz-Security-Token=tok",
            "https://b.s3.amazonaws.com/d.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        (
            "https://a.blob.core.windows.net/c/d.zip?sv=2022&sig=Zm9v%3D",
            "https://a.blob.core.windows.net/c/d.zip?sv=2022&sig=***",
        ),
        ("https://h/d.zip?access_token=a;api_key=b;page=3", "https://h/d.zip?access_token=***;api_key=***;page=3"),
        ("https://h/d.zip#access_token=abc&state=1", "https://h/d.zip#access_token=***&state=1"),
        ("https://h/d.zip?Password=x&dl=1", "https://h/d.zip?Password=***&dl=1"),
        ("https://example.com/cats_and_dogs_filtered.zip", "https://example.com/cats_and_dogs_filtered.zip"),
        (" http://u:pw@h/d.zip", " http://u:***@h/d.zip"),  # fetch strips the blank, and still fetches it
        ("http://u:pw@[::1/d.zip?token=abc", "http://u:***@[::1/d.zip?token=***"),  # unparseable, still hidden
        ("/data/with:colon@sign/photos", "/data/with:colon@sign/photos"),  # a path, not a URL
    ],
)
def test_redacted_hides_passwords_and_token_values(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_scrubbed_hides_secrets_a_library_quotes_outside_the_url() -> None:
    url = "http://alice:pa55word!@host/d.zip?token=tok-1234567&sig=sig%2Dabcdef"
    text = f"InvalidURL: nonnumeric port: 'pa55word!@host' (token tok-1234567, sig sig-abcdef) for {url}"
    assert scrubbed(text, url) == (
        "InvalidURL: nonnumeric port: '***@host' (token ***, sig ***) for http://alice:***@host/d.zip?token=***&sig=***"
    )


def secret_url(server: Server, token: str = "tok-1234567") -> str:
    return (
        f"http://alice:pa55word!@127.0.0.1:{server.port}/cats_and_dogs_filtered.zip"
        f"?token={token}&X-Amz-Signature=sig-abcdef&v=1"
    )


SECRETS = ("pa55word", "tok-1234567", "sig-abcdef", "tok-7654321")


def assert_no_secret(text: str) -> None:
    assert not [secret for secret in SECRETS if secret in text], text


def test_an_error_never_shows_the_password_or_token(server: Server, paths: dict[str, Path]) -> None:
    url = secret_url(server)
    server.handle = lambda request: send(request, b"nope", 404)
    with pytest.raises(PipelineError) as error:
        fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    message = assert_one_line(error)
    assert_no_secret(message)
    assert "404" in message and "alice:***@" in message and "token=***" in message and "v=1" in message


def test_an_unreachable_host_never_shows_the_password(paths: dict[str, Path]) -> None:
    url = closed_port_url().replace("http://", "http://alice:pa55word!@") + "?token=tok-1234567"
    with pytest.raises(PipelineError) as error:
        fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **{**FAST, "attempts": 1})
    message = assert_one_line(error)
    assert "cannot be reached" in message
    assert_no_secret(message)


def test_credentials_are_sent_as_basic_auth_and_recorded_redacted(
    server: Server, paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.handle = lambda request: send_versioned(request, DATA, '"v1"', MODIFIED)
    url = secret_url(server)
    fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    expected = "Basic " + base64.b64encode(b"alice:pa55word!").decode()
    assert server.requests[0]["Authorization"] == expected
    record_path = paths["target"].with_name("source.json")
    text = record_path.read_text()
    assert_no_secret(text)
    record = read_record(record_path)
    assert record is not None and record.url == redacted(url) and record.url_hash
    # The same URL is recognised through its hash: a conditional GET, and nothing rewritten.
    fetch(url, paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    assert server.requests[1].get("If-None-Match") == '"v1"'
    assert record_path.read_text() == text
    # A new token is a new URL, though it reads the same redacted.
    fetch(secret_url(server, "tok-7654321"), paths["target"], None, partial_dir=paths["partial_dir"], **FAST)
    assert "If-None-Match" not in server.requests[2]
    assert_no_secret(capsys.readouterr().err + record_path.read_text())


def test_the_model_card_shows_the_source_redacted() -> None:
    from tests.test_model_card import inputs
    from tlpipe.model_card import data_section

    card_inputs = inputs()
    card_inputs.source["url"] = "https://alice:pa55word!@example.com/pets.zip?sig=sig-abcdef"
    section = data_section(card_inputs)
    assert_no_secret(section)
    assert "https://alice:***@example.com/pets.zip?sig=***" in section


def test_the_stage_reads_the_limits_from_params(tmp_path: Path) -> None:
    source = tmp_path / "tiny.zip"
    source.write_bytes(DATA)
    workdir = tmp_path / "project"
    workdir.mkdir()
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["max_download_bytes"] = 1000
    result = run_stage(workdir, str(source), params)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "data.max_download_bytes (1,000 bytes)" in lines[0]
