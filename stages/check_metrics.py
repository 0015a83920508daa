"""Fail CI when a metric regressed: `python -m stages.check_metrics [--baseline REF]`.

Compares the workspace's metrics (every metrics file declared in dvc.yaml) with those committed at REF
(default HEAD), as DVC reads them, applies the tolerances of params.yaml `regression:`, and prints a Markdown
table. Exit code 0: nothing regressed; 1: something did (a metric got worse, disappeared or is not a finite
number, or a workspace metrics file cannot be read); 2: the comparison cannot be made (the baseline cannot be
read, params.yaml is invalid, or the table cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from tlpipe.errors import PipelineError, print_traceback, unexpected, visible, wants_traceback
from tlpipe.files import write_text
from tlpipe.gate import FAILING, BaselineError, check_revision, judge_all, markdown, metrics_diff, unreadable_line
from tlpipe.params import load_params

REGRESSED_EXIT, CANNOT_COMPARE_EXIT = 1, 2


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error of the gate (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(CANNOT_COMPARE_EXIT, f"error: {message} (see {self.prog} --help)\n")


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tl-check-metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        return check(args.baseline, args.output)
    except (BaselineError, PipelineError) as error:
        print(f"error: {visible(str(error))}", file=sys.stderr)
    except Exception as error:  # noqa: BLE001 - no traceback reaches CI's log, and the gate never passes by accident
        if wants_traceback():
            print_traceback(error)
        print(f"error: {visible(unexpected(error))}", file=sys.stderr)
    return CANNOT_COMPARE_EXIT


def check(baseline: str, output: Path | None) -> int:
    check_revision(baseline)  # before anything is read: the mistake is the user's, not a file's
    rules = load_params()["regression"]
    comparison = metrics_diff(baseline)
    rows = judge_all(comparison.diff, rules)
    table = markdown(rows, baseline, comparison.unreadable)
    print(table)
    for file, why in sorted(comparison.unreadable.items()):
        print(f"error: {visible(unreadable_line(file, why))}", file=sys.stderr)
    if output:
        try:
            write_text(output, table)
        except OSError as error:
            raise PipelineError(f"cannot write {output} ({error.strerror or error})") from None
    failed = comparison.unreadable or any(row.verdict in FAILING for row in rows)
    return REGRESSED_EXIT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
