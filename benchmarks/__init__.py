"""Benchmarks: run by hand (`python -m benchmarks.benchmark`), not part of the test suite.

Each writes its measurements to a committed JSON file and its tables into a page of the docs, between the
markers `<!-- <name>:start -->` and `<!-- <name>:end -->`, with the machine and the date (`insert_tables`).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


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


def insert_tables(page: Path, name: str, block: str) -> None:
    """Replace what lies between the page's `name` markers with `block`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{page} lacks the markers {start} ... {end}")
    pattern = f"{re.escape(start)}.*{re.escape(end)}"
    page.write_text(re.sub(pattern, lambda _: f"{start}\n{block}\n{end}", text, flags=re.S), encoding="utf-8")
