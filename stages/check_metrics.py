"""Fail CI when a metric regressed: `python -m stages.check_metrics [--baseline REF]`.

Compares the workspace's metrics (every metrics file declared in dvc.yaml) with those committed at REF
(default HEAD) through `dvc metrics diff --json`, applies the tolerances of params.yaml `regression:`,
and prints a Markdown table. Exit code 0: nothing regressed; 1: something did (or a metric disappeared);
2: the baseline cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlpipe.errors import PipelineError
from tlpipe.gate import FAILING, BaselineError, judge_all, markdown, metrics_diff
from tlpipe.params import load_params


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-check-metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        rules = load_params()["regression"]
        rows = judge_all(metrics_diff(args.baseline), rules)
    except (BaselineError, PipelineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = markdown(rows, args.baseline)
    print(table)
    if args.output:
        args.output.write_text(table, encoding="utf-8")
    return 1 if any(row.verdict in FAILING for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
