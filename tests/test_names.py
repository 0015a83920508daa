"""Names a dataset or a user chose (class folders, file names) in every kind of text the pipeline writes: one
line in a message, one cell in a Markdown table, one field in a CSV; the escaping helpers in tlpipe/errors.py."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import markdown as python_markdown
import pandas as pd
import pytest

from tests.test_model_card import inputs
from tests.test_train_aggregate import study_params, write_evaluation
from tlpipe import comparison
from tlpipe.errors import (
    PipelineError,
    markdown_cell,
    markdown_code,
    one_line,
    quoted,
    stage_main,
    visible,
)
from tlpipe.model_card import render
from tlpipe.output_formats import escape

# Names that have broken one kind of text or another: a table's cell separator, line breaks of every kind, a
# terminal escape sequence, a backslash, quotes, backticks, a byte that is not UTF-8 and a CSV separator.
ODD_NAMES = ["a|b", "ca\nts", "x\r\ny", "tab\there", "\x1b[31mred", "back\\slash", "it's", "a`b", "ff\udcff", 'd,o"g']
ODD_NAMES += ["line\u2028sep", "next\x85line", "é|ü", "|", "``", "x\\|y"]
UNESCAPED_PIPE = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def cells(row: str) -> list[str]:
    """A Markdown table row split on its unescaped pipes (a pipe after an even run of backslashes)."""
    return [cell.strip() for cell in UNESCAPED_PIPE.sub(lambda m: m.group(1) + "\0", row).strip("\0").split("\0")]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_one_line_is_printable_and_reversible(name: str) -> None:
    shown = one_line(name)
    assert shown.isprintable() and "\n" not in shown and "\r" not in shown
    # Unambiguous: Python's unicode_escape reads the escapes back to the name; an undecodable byte (kept by
    # Python as a lone surrogate) comes back as the byte it was.
    back = shown.encode("ascii", "backslashreplace").decode("unicode_escape")
    assert back == name.replace("\udcff", "\xff")


def test_visible_escapes_what_does_not_print_and_leaves_the_rest() -> None:
    assert visible("a\nb\tc\x1b\u2028é\\n") == "a\\nb\\tc\\x1b\\u2028é\\n"
    assert one_line("a\\nb") == "a\\\\nb"  # a backslash, then n: not a newline
    assert quoted("it's\n") == "'it\\'s\\n'" and quoted("cats") == "'cats'"
    assert escape("a\tb\x1b") == "a\\tb\\x1b"  # predict's text output: the same rules


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_markdown_cell_stays_one_cell_and_renders_as_the_name(name: str) -> None:
    row = f"| {markdown_cell(name)} | 3 |"
    assert "\n" not in row and len(cells(row)) == 2
    html = python_markdown.markdown(f"| class | n |\n|---|---|\n{row}\n", extensions=["tables"])
    rendered = re.search(r"<td>(.*?)</td>", html, re.DOTALL)
    assert rendered is not None, html
    if not {"<", "&", "`"} & set(name):  # HTML escaping and code spans aside, the cell reads as one_line(name),
        # less the doubling of backslashes, which Markdown undoes
        assert rendered.group(1) == one_line(name).replace("\\\\", "\\"), (name, rendered.group(1))


@pytest.mark.parametrize("name", ["a`b", "`x", "``", "plain", "a\nb"])
def test_markdown_code_keeps_the_name_in_one_code_span(name: str) -> None:
    html = python_markdown.markdown(f"classes: {markdown_code(name)}.")
    code = re.findall(r"<code>(.*?)</code>", html)
    assert code == [one_line(name)], html


def test_a_class_name_with_a_pipe_or_a_newline_keeps_the_model_card_table_whole() -> None:
    names = ["a|b", "ca\nts", "x`y"]
    base = inputs()
    counts = {split: {name: i + 1 for i, name in enumerate(names)} for split in ("train", "val", "test")}
    report = base.report | {"classes": names, "counts": counts, "left_out": [{"class": "f|o\nx", "usable_images": 1}]}
    card = render(inputs(report=report))
    lines = card.splitlines()
    header = lines.index("| class | train | val | test |")
    rows = lines[header + 2 : header + 2 + len(names)]
    assert [cells(row) for row in rows] == [
        [markdown_cell(name), f"{i}", f"{i}", f"{i}"] for i, name in enumerate(names, 1)
    ]
    assert "\n#" not in card.replace("\n## ", "")  # a name's line break never starts a heading
    assert "(`f|o\\nx`)" in card and "``x`y``" in card


def test_a_pipe_in_an_arch_keeps_the_comparison_table_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for key, right in (("a", 190), ("b", 194), ("c", 192), ("model", 191)):
        write_evaluation(tmp_path, key, right, 0.99, latency=10.0 if key != "model" else None)
    params = study_params()
    params["backbones"]["a"]["arch"] = "Mobile|Net\nV2"
    text = comparison.markdown(comparison.comparison_table(params), params)
    table = [line for line in text.splitlines() if line.startswith("|")]
    widths = {len(cells(line)) for line in table}
    assert len(table) == 6 and len(widths) == 1, table
    assert any("Mobile\\|Net\\nV2" in line for line in table)


def test_names_in_a_csv_round_trip(tmp_path: Path) -> None:
    """CSV files are written by the csv module or pandas; a name with separators, quotes and line breaks comes
    back whole (the manifest's own round trip is in tests/test_prepare.py)."""
    names = [name for name in ODD_NAMES if "\udcff" not in name]
    frame = pd.DataFrame({"label": names, "n": range(len(names))})
    path = tmp_path / "names.csv"
    frame.to_csv(path, index=False)
    assert pd.read_csv(path, keep_default_na=False)["label"].tolist() == names
    with path.open(newline="", encoding="utf-8") as file:
        assert [row["label"] for row in csv.DictReader(file)] == names


def test_an_error_that_forgot_to_escape_still_prints_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    @stage_main
    def main() -> None:
        raise PipelineError("class 'ca\nts' is too small\x1b[2J")

    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err == "error: class 'ca\\nts' is too small\\x1b[2J\n"
