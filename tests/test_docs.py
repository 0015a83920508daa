"""The documentation site (docs/, mkdocs.yml) builds without a warning, and what its pages name exists."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
DOC_PAGES = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "CONTRIBUTING.md", *PAGES]
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


@functools.cache
def params_yaml() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@functools.cache
def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages by the name `dvc repro` shows (`name@<b>` for a foreach stage), each its template."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    return {f"{name}@<b>" if "foreach" in spec else name: spec.get("do", spec) for name, spec in stages.items()}


def stage_paths(stage: dict, kinds: tuple[str, ...]) -> list[str]:
    """A stage's paths of these kinds (deps, outs, metrics, plots), `<b>` for any interpolated key."""
    entries = [e if isinstance(e, str) else next(iter(e)) for kind in kinds for e in stage.get(kind, [])]
    return [re.sub(r"\$\{[\w.]+\}", "<b>", entry).rstrip("/") for entry in entries]


OUTPUT_KINDS = ("outs", "metrics", "plots")


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
    return {path for stage in dvc_stages().values() for path in stage_paths(stage, OUTPUT_KINDS)}


def backbone_generic(name: str) -> str:
    """`backbones.vgg16.weights` as params' names spell it: `backbones.<b>.weights`."""
    return re.sub(r"^backbones\.[^.]+", "backbones.<b>", name)


def is_declared(path: str, outputs: set[str]) -> bool:
    """A stage writes the path, a file in it (a folder of outputs), or the folder it lies in."""
    path = path.rstrip("/")
    return any(path == out or path.startswith(f"{out}/") or out.startswith(f"{path}/") for out in outputs)


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda page: page.name)
def test_every_parameter_and_path_a_page_names_exists(page: Path) -> None:
    """A backticked `section.key` must be in params.yaml; a backticked path must be in the tree or be what
    dvc.yaml says a stage writes (`<b>` standing for a backbone; `<class>` paths are a dataset's layout)."""
    params = params_yaml()
    known, outputs = parameter_names(params), declared_outputs()
    problems = []
    for token in BACKTICKED.findall(page.read_text(encoding="utf-8")):
        if FILE_SUFFIX.search(token) and "/" not in token:
            continue
        if token.split("/")[0] in DATASET_PARTS:
            continue
        if token.split(".")[0] in params and "/" not in token and backbone_generic(token) not in known:
            problems.append(f"parameter {token}")
        elif "/" in token and "<class>" not in token and re.fullmatch(r"[\w./<>-]+", token):
            path = token.rstrip("/")
            if not ((PROJECT_ROOT / path).exists() or is_declared(path, outputs)):
                problems.append(f"path {token}")
    assert not problems, f"{page.name} names what does not exist: {problems}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda page: page.name)
def test_measured_tables_are_filled_in_and_pages_speak_of_the_project_only(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for name, block in MARKERS.findall(text):
        assert "Measured " in block, f"{page.name}: run the benchmark that fills `{name}`"
    assert "../shared" not in text and not re.search(r"\b(this stop|session|issue \d+)\b", text, re.I)


# --- docs that cannot drift: every name a page gives is checked against what defines it ---

SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
TEST_NAME = re.compile(r"(?:(test_\w+)\.py)?(?:::)?(test_\w+)?")
COMMAND = re.compile(r"(tl-predict|tl-check-metrics|python -m (?:stages|benchmarks|tests)\.\w+)([^|;&#`\n]*)")
SETTING = re.compile(r"-S\s+[\"']?([\w.]+)=")  # not `-S +key=...`, which adds a key
# A measured number: a time, a size, a throughput or a speed-up. They belong in a benchmark's block.
MEASURED = re.compile(r"\b\d+(?:[.,]\d+)?\s?(?:x|ms|s|min|minutes|h|hours|KB|MB|GB|images/s)\b")
# Names of other libraries' APIs that the pages mention.
EXTERNAL = {"serving_default", "map_batches", "predict_batch_udf"}
# A file name, not a dotted parameter (`model.keras` is no key of `model`).
FILE_SUFFIX = re.compile(r"\.(keras|tflite|onnx|json|md|py|csv|png|zip|h5|yaml|lock|txt)$")
# Paths inside a dataset or a weights folder, not in the project.
DATASET_PARTS = {"train", "validation", "__MACOSX", "<class>", "photos", "new_photos"}
ENTRY_POINTS = {"tl-predict": "stages.predict", "tl-check-metrics": "stages.check_metrics"}


def page_id(page: Path) -> str:
    return page.relative_to(PROJECT_ROOT).as_posix()


def prose(text: str) -> str:
    """A page without its fenced code blocks."""
    return FENCE.sub("", text)


def outside_markers(text: str) -> str:
    return MARKERS.sub("", text)


def code_identifiers() -> set[str]:
    """Every name and string constant in the project's Python: a key a page names must be spelled somewhere."""
    names: set[str] = set()
    for folder in ("stages", "tlpipe", "tests", "benchmarks"):
        for file in (PROJECT_ROOT / folder).glob("*.py"):
            names.add(file.stem)
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Name):
                    names.add(node.id)
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names |= set(SNAKE.findall(node.value))
    return names


def yaml_names(value: object) -> set[str]:
    """Every key and string value of a parsed YAML or JSON document."""
    if isinstance(value, dict):
        return {str(k) for k in value} | {n for v in value.values() for n in yaml_names(v)}
    if isinstance(value, list):
        return {n for v in value for n in yaml_names(v)}
    return {value} if isinstance(value, str) else set()


@functools.cache
def known_names() -> frozenset[str]:
    names = code_identifiers() | yaml_names(params_yaml())
    names |= yaml_names(yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text()))
    for file in (PROJECT_ROOT / "tests" / "gate" / "metrics").rglob("*.json"):
        names |= yaml_names(json.loads(file.read_text()))
    return frozenset(names)


def argument_parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).argument_parser()


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_problems(text: str) -> list[str]:
    """Each project command a page runs exists, and every --flag given to it is one its parser has."""
    problems = []
    for command, rest in COMMAND.findall(text):
        module = ENTRY_POINTS.get(command, command.removeprefix("python -m "))
        if importlib.util.find_spec(module) is None:
            problems.append(f"command {command}")
            continue
        flags = {token.split("=")[0] for token in rest.split() if token.startswith("--")}
        if unknown := flags - flags_of(argument_parser_of(module)):
            problems.append(f"{command} has no {sorted(unknown)}")
    return problems


def unknown_tests(tokens: list[str]) -> list[str]:
    """`test_file.py::test_name` and bare `test_name` refer to tests that exist."""
    problems, defined = [], {}
    for file in (PROJECT_ROOT / "tests").glob("test_*.py"):
        defined[file.stem] = set(re.findall(r"^def (test_\w+)", file.read_text(encoding="utf-8"), re.M))
    every = set().union(*defined.values())
    for token in tokens:
        match = TEST_NAME.fullmatch(token)
        if not match or not any(match.groups()):
            continue
        module, name = match.groups()
        if module and module not in defined:
            problems.append(f"test file {module}.py")
        elif name and name not in (defined[module] if module else every):
            problems.append(f"test {token}")
    return problems


@pytest.mark.parametrize("page", DOC_PAGES, ids=page_id)
def test_every_name_a_page_gives_exists(page: Path) -> None:
    """Backticked keys and identifiers exist in params.yaml, dvc.yaml, the gate's metrics files or the code;
    tests named exist; project commands exist with the flags given; `-S` sets parameters params.yaml has."""
    text = page.read_text(encoding="utf-8")
    known = known_names()
    params = parameter_names(params_yaml())
    spans = SPAN.findall(prose(text))
    problems = [
        f"name {s}" for s in spans if SNAKE.fullmatch(s) and s not in known | EXTERNAL and not s.startswith("test_")
    ]
    problems += unknown_tests([s for s in spans if "test_" in s])
    problems += command_problems(text)
    problems += [f"-S {key}" for key in SETTING.findall(text) if backbone_generic(key) not in params]
    assert not problems, f"{page_id(page)} names what does not exist: {problems}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=page_id)
def test_measured_numbers_sit_between_markers(page: Path) -> None:
    """A time, size, throughput or speed-up outside a benchmark's block was typed by hand and will drift."""
    text = outside_markers(prose(page.read_text(encoding="utf-8")))
    found = [m.group(0) for m in MEASURED.finditer(text)]
    assert not found, f"{page_id(page)}: measured numbers outside a benchmark's markers: {found}"


def upstream_stages() -> dict[str, set[str]]:
    """Each stage of dvc.yaml (`name@<b>` for a foreach stage) and the stages whose outputs it reads."""
    named = dvc_stages()
    writers = {out: name for name, stage in named.items() for out in stage_paths(stage, OUTPUT_KINDS)}
    return {
        name: {
            writer
            for dep in stage_paths(stage, ("deps",))
            for out, writer in writers.items()
            if writer != name and (dep == out or dep.startswith(f"{out}/") or out.startswith(f"{dep}/"))
        }
        for name, stage in named.items()
    }


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under a heading."""
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in lines[start + 2 : end]]


def stage_parameters() -> dict[str, set[str]]:
    return {
        name: {re.sub(r"\$\{[\w.]+\}", "<b>", p) for p in stage.get("params", [])}
        for name, stage in dvc_stages().items()
    }


def test_the_stage_table_is_dvc_yaml() -> None:
    """docs/pipeline.md lists every stage, the stages it runs after, exactly the parameters dvc.yaml gives it,
    and only outputs dvc.yaml declares."""
    rows = table_rows((DOCS / "pipeline.md").read_text(encoding="utf-8"), "## Stages")
    cells = {row[0].strip("`"): [re.findall(r"`([^`]+)`", cell) for cell in row[1:]] for row in rows}
    upstream, parameters, outputs = upstream_stages(), stage_parameters(), declared_outputs()
    assert set(cells) == set(upstream), "docs/pipeline.md's stages are not dvc.yaml's"
    wrong = {name: sorted(upstream[name]) for name, (after, _, _) in cells.items() if set(after) != upstream[name]}
    assert not wrong, f"docs/pipeline.md: each stage runs after {wrong}"
    wrong = {
        name: sorted(parameters[name])
        for name, (_, listed, _) in cells.items()
        if name != "validate" and set(listed) != parameters[name]
    }
    assert not wrong, f"docs/pipeline.md: dvc.yaml gives each stage the parameters {wrong}"
    undeclared = [
        path for *_, written in cells.values() for path in written if "/" in path and not is_declared(path, outputs)
    ]
    assert not undeclared, f"docs/pipeline.md: no stage writes {undeclared}"


def test_the_parameter_table_has_every_parameter_with_its_default() -> None:
    params = params_yaml()
    rows = table_rows((DOCS / "pipeline.md").read_text(encoding="utf-8"), "## Parameters")
    table = {row[0].strip("`"): row[1] for row in rows}
    names = parameter_names(params)
    leaves = {name for name in names if not any(other.startswith(f"{name}.") for other in names)}
    missing = [n for n in sorted(leaves) if not any(n == row or n.startswith(f"{row}.") for row in table)]
    assert not missing, f"docs/pipeline.md's parameter table lacks {missing}"
    wrong = []
    for name, default in table.items():
        if "<b>" in name or not re.fullmatch(r"`[^`]*`", default):
            continue
        if yaml.safe_load(default.strip("`")) != lookup(params, name):
            wrong.append(f"{name}: {default} but params.yaml has {lookup(params, name)!r}")
    assert not wrong, f"docs/pipeline.md's defaults: {wrong}"


def lookup(params: dict, name: str) -> object:
    value: object = params
    for part in name.split("."):
        value = value[part]
    return value


def test_the_layout_names_every_module() -> None:
    """CONTRIBUTING.md's layout says what each module of the library and each entry point is for."""
    layout = (PROJECT_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ")[0]
    named = set(re.findall(r"`([\w./]+)`", layout))
    modules = [f.stem for f in (PROJECT_ROOT / "tlpipe").glob("*.py") if f.stem != "__init__"]
    stages = [f.stem for f in (PROJECT_ROOT / "stages").glob("*.py") if f.stem != "__init__"]
    in_dvc_yaml = {name.removesuffix("@<b>") for name in dvc_stages()}
    missing = sorted(m for m in modules if m not in named) + sorted(
        s for s in stages if s not in named and s not in in_dvc_yaml
    )
    assert not missing, f"CONTRIBUTING.md's layout does not name {missing}"


def test_every_measured_block_is_its_results_file_rendered() -> None:
    """The numbers between markers are what the benchmark that measured them renders from its committed
    results file: a number edited by hand, or a results file committed without its tables, fails."""
    from benchmarks.tables import rendered, stale

    assert not stale(), f"run `python -m benchmarks.tables`: {stale()}"
    on_pages = {(page_id(page), name) for page in DOC_PAGES for name, _ in MARKERS.findall(page.read_text("utf-8"))}
    assert on_pages <= set(rendered()), f"blocks no benchmark renders: {sorted(on_pages - set(rendered()))}"
