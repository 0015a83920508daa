"""User-facing errors: one line by default, the whole traceback with TL_TRACEBACK=1.

Also the one place that escapes names (class folders, file names from an archive, anything a user or a dataset
chose) for the three kinds of text they end up in: one-line messages (`one_line`, `quoted`), Markdown
(`markdown_cell`, `markdown_code`); CSV files are written by the csv module (or pandas, which uses it), which
quotes separators, quotes and line breaks.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# How a character that does not print is shown; the others as \xNN, \uNNNN or \UNNNNNNNN, as Python writes them.
CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Python keeps a file name's bytes that are not UTF-8 as these lone surrogates (PEP 383).
SURROGATE_BYTES = range(0xDC80, 0xDD00)

# Set to 1 to see the full traceback (with the original exception a one-line error replaced) of any error.
TRACEBACK_VARIABLE = "TL_TRACEBACK"


class PipelineError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def visible(text: str) -> str:
    """`text` with every character that does not print (line breaks, tabs, control characters, Unicode line
    separators, undecodable bytes) written as its escape, so it stays on one line and cannot move a terminal's
    cursor. Leaves backslashes alone: for text already escaped, such as a whole message."""
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in CONTROL_ESCAPES:
        return CONTROL_ESCAPES[char]
    if code in SURROGATE_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def undecodable_bytes(text: str) -> str:
    """A file name's bytes that are not UTF-8 (Python keeps them as lone surrogates) as `\\xNN`, the rest as
    it is: for CSV fields, which the csv module quotes but which must still encode as UTF-8."""
    return "".join(_escape_char(char) if ord(char) in SURROGATE_BYTES else char for char in text)


def one_line(text: str) -> str:
    """A name on one line, unambiguously: backslashes doubled, then what does not print escaped (`visible`)."""
    return visible(text.replace("\\", "\\\\"))


def quoted(text: str) -> str:
    """A name in a one-line message: `'<one_line(name)>'`, a quote inside escaped."""
    return "'" + one_line(text).replace("'", "\\'") + "'"


def markdown_cell(text: str) -> str:
    """A name in a Markdown table cell: on one line (`one_line`), and `|` escaped so it cannot end the cell."""
    return one_line(text).replace("|", "\\|")


def markdown_code(text: str) -> str:
    """A name as inline code in Markdown prose: on one line, fenced by more backticks than it holds."""
    shown = one_line(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", shown)), default=0) + 1)
    padded = f" {shown} " if shown.startswith("`") or shown.endswith("`") else shown
    return f"{fence}{padded}{fence}"


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: for one-line errors."""
    # KeyError's str() wraps its message in quotes.
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def removes_outputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    """Whether DVC deleted outputs of `stage` before running it: it does for every output but `persist` ones."""
    import yaml

    try:
        spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][stage.split("@")[0]]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return True  # cannot tell: better a hint too many than a lost result
    spec = spec.get("do", spec)
    entries = [entry for kind in ("outs", "metrics", "plots") for entry in spec.get(kind) or []]
    return any(not (isinstance(entry, dict) and next(iter(entry.values()), {}).get("persist")) for entry in entries)


def recovery_hint(stage: str | None) -> str:
    """How to get back what DVC removed before running `stage` (it deletes a stage's outputs first)."""
    if not stage or not removes_outputs(stage):
        return ""
    return (
        f" [dvc removed the previous outputs of {stage} before running it: `dvc checkout {stage}` restores "
        "the cached ones; metrics and pictures you committed come back with `git checkout -- <path>`]"
    )


def wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def print_traceback(error: BaseException) -> None:
    """The full traceback, including the exceptions that `raise ... from None` hid behind a one-line error."""
    cause: BaseException | None = error
    while cause is not None:
        cause.__suppress_context__ = False
        cause = cause.__cause__ or cause.__context__
    traceback.print_exception(error, file=sys.stderr)


def unexpected(error: BaseException) -> str:
    """One line for an error no check of ours foresaw (a bug, or a TensorFlow failure)."""
    return (
        f"unexpected {type(error).__name__}: {first_line(error)} "
        f"(rerun with {TRACEBACK_VARIABLE}=1 for the traceback, and please report it)"
    )


def stage_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage's main(), turning any error into one line on stderr and exit code 1.

    Under `dvc repro` (which sets DVC_STAGE) the line also says how to restore the stage's previous outputs.
    With TL_TRACEBACK=1 the full traceback comes first.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted; nothing was half-written, rerun the stage", file=sys.stderr)
            sys.exit(130)
        except Exception as error:  # noqa: BLE001 - the boundary between the pipeline and the user
            if wants_traceback():
                print_traceback(error)
            message = str(error) if isinstance(error, PipelineError) else unexpected(error)
            # visible(): a name some message forgot to escape still cannot break the line.
            print(f"error: {visible(message)}{recovery_hint(os.environ.get('DVC_STAGE'))}", file=sys.stderr)
            sys.exit(1)

    return wrapper
