"""Stage `fetch`: bring the dataset to `data/raw/dataset.zip`, complete and verified, or not at all.

`data.url` may be an http(s):// URL, a file:// URL, a local zip, or a local image folder
(`train/<class>/` + `validation/<class>/`, or `<class>/`), which is packed into a zip.

DVC runs this stage on every `dvc repro` (`always_changed`), so that a change in what `data.url`
points at is seen, not only a change of the URL itself. The archive is replaced only when the
source's bytes differ from it (tlpipe/download.py says how each kind of source is checked); otherwise
it is left untouched, DVC finds the same hash and skips every stage after this one. What the archive came
from, with the server's validators for the next check, is recorded in `data/raw/source.json`.

Every fetch is bounded by data.max_download_bytes, data.download_deadline and data.min_download_rate, and
replaces the archive only with a readable zip; a failed one leaves the archive and its record as they were.
"""

from __future__ import annotations

from tlpipe.download import Limits, fetch, read_record, source_of
from tlpipe.errors import stage_main
from tlpipe.files import sha256_file
from tlpipe.params import load_params
from tlpipe.paths import RAW_ARCHIVE, SOURCE_RECORD


@stage_main
def main() -> None:
    data = load_params()["data"]
    limits = Limits(
        max_bytes=data["max_download_bytes"],
        deadline_s=data["download_deadline"],
        min_rate=data["min_download_rate"],
    )
    archive = fetch(data["url"], RAW_ARCHIVE, data["sha256"], record=SOURCE_RECORD, limits=limits)
    source = read_record(SOURCE_RECORD) or source_of(data["url"], sha256_file(archive), archive.stat().st_size)
    pin = "" if data["sha256"] else " (set data.sha256 to this to pin the dataset)"
    print(f"{archive}: {source.size} bytes, sha256 {source.sha256}{pin}")


if __name__ == "__main__":
    main()
