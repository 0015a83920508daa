"""The documentation site (docs/, mkdocs.yml) builds without a warning, and what its pages name exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BACKTICKED = re.compile(r"`([^`\s]+)`")
MARKERS = re.compile(r"<!-- (\w+):start -->(.*?)<!-- \1:end -->", re.S)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """--strict turns every warning into a failure: a link to a page or anchor that does not exist, a page
    left out of the navigation."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def parameter_names(params: dict, prefix: str = "") -> set[str]:
    """Every dotted parameter name in params.yaml, sections included, with `<b>` for a backbone's key."""
    names = set()
    for key, value in params.items():
        name = f"{prefix}{'<b>' if prefix == 'backbones.' else key}"
        names.add(name)
        if isinstance(value, dict) and key != "regression":
            names |= parameter_names(value, f"{name}.")
    return names


def declared_outputs() -> set[str]:
    """Every output, metric and plot of dvc.yaml, with `<b>` for a backbone's key."""
    outputs = set()
    for stage in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values():
        stage = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                outputs.add(path.replace("${key}", "<b>").replace("${model}", "<b>"))
    return outputs


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_parameter_and_path_a_page_names_exists(page: Path) -> None:
    """A backticked `section.key` must be in params.yaml; a backticked path must be in the tree or be what
    dvc.yaml says a stage writes (`<b>` standing for a backbone; `<class>` paths are a dataset's layout)."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    known, outputs = parameter_names(params), declared_outputs()
    problems = []
    for token in BACKTICKED.findall(page.read_text(encoding="utf-8")):
        if token.split(".")[0] in params and "/" not in token and token not in known:
            problems.append(f"parameter {token}")
        elif "/" in token and "<class>" not in token and re.fullmatch(r"[\w./<>-]+", token):
            path = token.rstrip("/")
            declared = any(path == out or path.startswith(f"{out}/") for out in outputs)
            if not ((PROJECT_ROOT / path).exists() or declared):
                problems.append(f"path {token}")
    assert not problems, f"{page.name} names what does not exist: {problems}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_measured_tables_are_filled_in_and_pages_speak_of_the_project_only(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for name, block in MARKERS.findall(text):
        assert "Measured on" in block and "|---" in block, f"{page.name}: run the benchmark that fills `{name}`"
    assert "../shared" not in text and not re.search(r"\b(this stop|session|issue \d+)\b", text, re.I)
