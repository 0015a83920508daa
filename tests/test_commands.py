"""The project's commands (tl-predict, tl-check-metrics, `python -m tests.ci_gate`, `python -m
tests.test_dependencies`): each builds its parser in `argument_parser()`, so that their flags can be checked
without running them, and its help reads right."""

from __future__ import annotations

import importlib

import pytest

COMMANDS = ("stages.predict", "stages.check_metrics", "tests.ci_gate", "tests.test_dependencies")


@pytest.mark.parametrize("module", COMMANDS)
def test_help_text_closes_every_backtick(module: str) -> None:
    """An odd count means a quoted command runs on into the prose after it (a description cut mid-quote)."""
    help_text = importlib.import_module(module).argument_parser().format_help()
    assert help_text.count("`") % 2 == 0, help_text
    for line_group in help_text.split("\n\n"):  # argparse keeps each paragraph's quotes in it
        assert line_group.count("`") % 2 == 0, line_group
