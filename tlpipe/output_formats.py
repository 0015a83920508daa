"""How `tl-predict` writes predictions: text, csv or json on stdout, one escaped line per error on stderr."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tlpipe.errors import one_line, undecodable_bytes
from tlpipe.prediction import Prediction

TEXT_DECIMALS = 4
CSV_DECIMALS = 6
# JSON carries whole probability rows, which programs score: at 8 decimals a row of even a thousand classes
# still sums to 1 within 1e-5 (scikit-learn's tolerance), and that is about all a float32 output holds.
JSON_DECIMALS = 8


def escape(text: str) -> str:
    """`text` on one line: backslash, newline, carriage return, tab and every other character that does not
    print escaped as in a Python string, undecodable bytes as `\\xNN` (tlpipe.errors.one_line)."""
    return one_line(text)


def json_record(prediction: Prediction) -> dict[str, Any]:
    probabilities = prediction.probabilities
    return {
        "path": prediction.path,
        "label": prediction.label,
        "probability": None if prediction.probability is None else round(prediction.probability, JSON_DECIMALS),
        "probabilities": None if probabilities is None else [round(p, JSON_DECIMALS) for p in probabilities],
        "error": prediction.error,
    }


def csv_row(prediction: Prediction) -> list[str]:
    probability = "" if prediction.probability is None else f"{prediction.probability:.{CSV_DECIMALS}f}"
    # The csv module quotes separators and line breaks; only bytes that are not UTF-8 cannot be written.
    fields = [prediction.path, prediction.label or "", probability, prediction.error or ""]
    return [undecodable_bytes(field) for field in fields]


def text_line(prediction: Prediction) -> str:
    return f"{escape(prediction.path)}\t{escape(prediction.label or '')}\t{prediction.probability:.{TEXT_DECIMALS}f}"


def report_error(path: str | Path, reason: str) -> None:
    print(f"error: {escape(str(path))}: {escape(reason)}", file=sys.stderr)


def write_predictions(predictions: Iterable[Prediction], fmt: str, out: TextIO) -> tuple[int, int]:
    """Print each prediction as it comes, json too (a list written record by record, the bytes json.dump
    with indent=2 writes), so nothing grows with the number of images; errors also go to stderr. Returns
    (classified, failed)."""
    classified = failed = 0
    # RFC 4180 line ends (\r\n): with them the csv module also quotes a lone \r inside a field.
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(["path", "label", "probability", "error"])
    for prediction in predictions:
        if prediction.error:
            failed += 1
            report_error(prediction.path, prediction.error)
        else:
            classified += 1
        if writer:
            writer.writerow(csv_row(prediction))
        elif fmt == "json":
            record = textwrap.indent(json.dumps(json_record(prediction), indent=2), "  ")
            out.write(("[\n" if classified + failed == 1 else ",\n") + record)
        elif not prediction.error:
            print(text_line(prediction), file=out)
        out.flush()
    if fmt == "json":
        out.write("\n]\n" if classified + failed else "[]\n")
    return classified, failed
