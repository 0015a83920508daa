"""Re-render every measured block of every page from the committed results: `python -m benchmarks.tables`.

Each benchmark renders its blocks from its own results file (`benchmarks/<name>.json`); this runs them all, and
measures nothing. `rendered()` is what a test compares with the pages on disk.
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks import PROJECT_ROOT, Block, load_results, write_blocks

# Every benchmark with a results file, by module name (`benchmarks.<name>`, `benchmarks/<name>.json`).
BENCHMARKS = (
    "benchmark",
    "study",
    "coverage",
    "heads",
    "scaling",
    "engine",
    "export",
    "predict",
    "audit",
    "extraction",
    "finetune",
    "default_run",
)


def rendered() -> dict[Block, str]:
    """Every block of every page, {(page relative to the project root, marker name): block}, as the committed
    results render it."""
    blocks: dict[Block, str] = {}
    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        for place, block in module.blocks(load_results(name)).items():
            if place in blocks:
                raise ValueError(f"{place} is rendered by two benchmarks")
            blocks[place] = block
    return blocks


def stale() -> list[Block]:
    """The blocks whose text on disk differs from their rendering (a missing marker pair counts)."""
    import re

    out = []
    for (page, name), block in rendered().items():
        path = PROJECT_ROOT / page
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        found = re.search(f"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
        if not found or found.group(1) != block:
            out.append((page, name))
    return out


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page's block is out of date")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.check:
        if out_of_date := stale():
            raise SystemExit("out of date: " + ", ".join(f"{page} {name}" for page, name in out_of_date))
        return
    blocks = rendered()  # all of them first: an error in one leaves every page as it was
    write_blocks(blocks)
    for page, name in blocks:
        print(f"{page}: {name}")


if __name__ == "__main__":
    main()
