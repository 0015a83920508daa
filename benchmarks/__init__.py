"""Benchmarks: run by hand (`python -m benchmarks.benchmark`), not part of the test suite.

Each writes its measurements, with the machine and the date, to a committed JSON file (`benchmarks/<name>.json`)
and renders its tables from that file into pages of the docs, between the markers `<!-- <name>:start -->` and
`<!-- <name>:end -->`. `--table-only` re-renders from the committed file without measuring;
`python -m benchmarks.tables` re-renders every block of every page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT_ROOT / "benchmarks"

# ImageNet weights the shared folder holds, by architecture.
SHARED_WEIGHTS = {
    "VGG16": "vgg16_imagenet_notop.weights.h5",
    "MobileNetV2": "mobilenet_v2_1.0_224_imagenet_notop.weights.h5",
}

# A block's place: (page relative to the project root, marker name).
Block = tuple[str, str]


def code_at(revision: str, folder: Path, paths: tuple[str, ...]) -> str:
    """`paths` of the project as committed at git `revision`, copied into the new `folder` (`git archive`, so
    what the working tree changed does not leak in); the revision's short hash."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, *paths], cwd=PROJECT_ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return commit


def machine() -> str:
    """What the numbers were measured on: the CPU model, its core count, and whether it has AVX-512 and
    bfloat16 arithmetic (speed depends on both)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    vector = (
        "AVX512_BF16"
        if "avx512_bf16" in flags
        else "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else ""
    )
    return ", ".join(part for part in (model, f"{os.cpu_count()} cores", vector) if part)


def backbones_with_offline_weights(shared: Path) -> dict[str, dict[str, Any]]:
    """The default backbones of params.yaml; real weights where `shared` has them, random otherwise (the same
    compute)."""
    import yaml

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    out = {}
    for key, spec in params["backbones"].items():
        weights = SHARED_WEIGHTS.get(spec["arch"])
        out[key] = spec | {"weights": str(shared / "weights" / weights) if weights else None}
    return out


def benchmark_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: its command as `prog`, its docstring's first line, and
    --table-only."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0])
    parser.add_argument(
        "--table-only", action="store_true", help=f"re-render the tables from {name}.json, measure nothing"
    )
    return parser


def stamp() -> dict[str, str]:
    """The `machine` and `date` every results file starts with."""
    return {"machine": machine(), "date": date.today().isoformat()}


def measured(report: dict[str, Any], name: str) -> str:
    """The opening of every block: where, when and by what its numbers were measured."""
    return f"Measured on {report['machine']}, {report['date']}, by `python -m benchmarks.{name}`"


def results_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def load_results(name: str) -> dict[str, Any]:
    return json.loads(results_path(name).read_text(encoding="utf-8"))


def save_results(name: str, report: dict[str, Any]) -> None:
    results_path(name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def insert_tables(page: Path, name: str, block: str) -> None:
    """Replace what lies between the page's `name` markers with `block`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{page} lacks the markers {start} ... {end}")
    pattern = f"{re.escape(start)}.*?{re.escape(end)}"
    page.write_text(re.sub(pattern, lambda _: f"{start}\n{block}\n{end}", text, flags=re.S), encoding="utf-8")


def write_blocks(blocks: dict[Block, str]) -> None:
    """Write every block into its page. Callers render them all first, so that a rendering error leaves no
    page half updated."""
    for (page, name), block in blocks.items():
        insert_tables(PROJECT_ROOT / page, name, block)


def publish(blocks: dict[Block, str]) -> None:
    """Write a benchmark's blocks into their pages and print each once."""
    write_blocks(blocks)
    for block in dict.fromkeys(blocks.values()):
        print(block)


def markdown(rows: list[dict[str, Any]], columns: dict[str, str], left: int = 1) -> str:
    """A Markdown table of `rows`: `columns` maps each key to its header, the first `left` columns aligned left
    and the rest (numbers) right; a missing value is shown as –."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
    for row in rows:
        cells = ("–" if row.get(key) in (None, "") else str(row[key]) for key in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
