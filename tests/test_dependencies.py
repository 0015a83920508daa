"""dvc.yaml declares exactly what each stage reads: the project modules its command imports (checked here,
statically) and the parameters its code reads (checked against a real run in test_pipeline_e2e.py).

`python -m tests.test_dependencies --write` rewrites each stage's code dependencies in dvc.yaml to the
modules its command imports, and leaves every other line as it is.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import PROJECT_ROOT

STAGE_PACKAGE = "stages"
PACKAGES = (STAGE_PACKAGE, "tlpipe")


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not a project module."""
    path = PROJECT_ROOT / Path(*module.split("."))
    if (file := path.with_suffix(".py")).is_file():
        return file
    if (init := path / "__init__.py").is_file():
        return init
    return None


def imported_modules(file: Path) -> set[str]:
    """Every project module the file imports, at any depth of its code (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from tlpipe import pictures`
    return {name for name in found if name.split(".")[0] in PACKAGES and module_file(name)}


def with_packages(module: str) -> list[str]:
    """`a.b.c` and the packages Python imports first: `a`, `a.b`."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def transitive_files(module: str) -> set[str]:
    seen: set[str] = set()
    todo = with_packages(module)
    while todo:
        name = todo.pop()
        file = module_file(name)
        relative = file.relative_to(PROJECT_ROOT).as_posix() if file else None
        if relative is None or relative in seen:
            continue
        seen.add(relative)
        todo += [parent for imported in imported_modules(file) for parent in with_packages(imported)]
    return seen


def stage_templates(text: str | None = None) -> dict[str, dict]:
    """Each stage of dvc.yaml (or of `text`), a foreach stage's `do:` template in its place."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text() if text is None else text)["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def stage_module(stage: dict) -> str:
    return re.match(r"python -m (stages\.\w+)", stage["cmd"]).group(1)


WRITE_COMMAND = "python -m tests.test_dependencies --write"


def is_code_dep(dep: Any) -> bool:
    return isinstance(dep, str) and dep.split("/")[0] in PACKAGES and dep.endswith(".py")


def code_dep_problems(text: str) -> list[str]:
    """What each stage of a dvc.yaml's text lists wrongly among its code dependencies."""
    problems = []
    for name, stage in stage_templates(text).items():
        needed = transitive_files(stage_module(stage))
        listed = {dep for dep in stage.get("deps", []) if is_code_dep(dep)}
        if missing := needed - listed:
            problems.append(f"{name} does not list {sorted(missing)}")
        if extra := listed - needed:
            problems.append(f"{name} lists {sorted(extra)}, which it does not import")
    return problems


def test_every_stage_lists_exactly_the_project_modules_it_imports() -> None:
    problems = code_dep_problems((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems) + f"\nrun `{WRITE_COMMAND}` to rewrite them"


# --- the writer: text-based, so that comments, anchors and the order of the other deps stay byte for byte ---

CODE_DEP_LINE = re.compile(r"^\s*- ((?:stages|tlpipe)/\S+\.py)\s*(#.*)?$")
KEY_LINE = re.compile(r"^(\s*)([\w@-]+):\s*(#.*)?$")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def is_content(line: str) -> bool:
    """Not blank and not a comment: a line that ends the block above it when indented less."""
    return bool(line.strip()) and not line.lstrip().startswith("#")


def block_end(lines: list[str], start: int) -> int:
    """The index after the block that the key on line `start` opens (its deeper-indented lines)."""
    end = start + 1
    while end < len(lines) and (not is_content(lines[end]) or indent_of(lines[end]) > indent_of(lines[start])):
        end += 1
    return end


def stage_spans(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Each stage's line range under the top-level `stages:` key."""
    top = next(i for i, line in enumerate(lines) if line.rstrip() == "stages:")
    end = block_end(lines, top)
    headers = [i for i in range(top + 1, end) if is_content(lines[i])]
    stage_indent = indent_of(lines[headers[0]])
    starts = [i for i in headers if indent_of(lines[i]) == stage_indent]
    return {KEY_LINE.match(lines[i]).group(2): (i, block_end(lines, i)) for i in starts}


def rewritten_deps(lines: list[str], start: int, end: int, needed: list[str], stage: str) -> list[str]:
    """lines[start:end] (one stage) with its code dependencies replaced by `needed`, where the first was."""
    deps = next(
        (i for i in range(start, end) if (m := KEY_LINE.match(lines[i])) and m.group(2) == "deps"),
        None,
    )
    if deps is None:
        raise SystemExit(f"dvc.yaml: stage {stage} has no deps:; add one, then run `{WRITE_COMMAND}`")
    deps_end = block_end(lines, deps)
    items = [i for i in range(deps + 1, deps_end) if is_content(lines[i])]
    code = [i for i in items if CODE_DEP_LINE.match(lines[i])]
    at = code[0] if code else deps + 1
    item_indent = " " * (indent_of(lines[items[0]]) if items else indent_of(lines[deps]) + 2)
    newline = "\r\n" if lines[deps].endswith("\r\n") else "\n"
    kept_lines = {CODE_DEP_LINE.match(lines[i]).group(1): lines[i] for i in code}  # with their comments
    block = [kept_lines.get(path, f"{item_indent}- {path}{newline}") for path in needed]
    kept = [(i, line) for i, line in enumerate(lines[start:end], start) if i not in code]
    before = [line for i, line in kept if i < at]
    return before + block + [line for i, line in kept if i >= at]


def with_code_deps(text: str) -> str:
    """dvc.yaml's text with each stage's code dependencies the modules its command imports (sorted)."""
    lines = text.splitlines(keepends=True)
    templates = stage_templates(text)
    out, done = [], 0
    for name, (start, end) in stage_spans(lines).items():
        needed = sorted(transitive_files(stage_module(templates[name])))
        out += lines[done:start] + rewritten_deps(lines, start, end, needed, name)
        done = end
    return "".join(out + lines[done:])


def write_code_deps(path: Path) -> bool:
    """Rewrite the code dependencies of the dvc.yaml at `path`; True when it changed. Bytes, not text, so
    that line endings stay as they are."""
    text = path.read_bytes().decode("utf-8")
    new = with_code_deps(text)
    if new != text:
        path.write_bytes(new.encode("utf-8"))
    return new != text


def test_the_writer_fixes_a_missing_and_an_extra_code_dependency(tmp_path: Path) -> None:
    real = (PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert with_code_deps(real) == real  # what the command would write is what is committed
    broken = real.replace("      - tlpipe/audit.py\n", "", 1)  # the audit stage's own library
    broken = broken.replace("      - stages/ship.py\n", "      - stages/ship.py\n      - tlpipe/models.py\n", 1)
    assert broken != real and len(code_dep_problems(broken)) == 2
    copy = tmp_path / "dvc.yaml"
    copy.write_text(broken, encoding="utf-8")
    assert write_code_deps(copy) and copy.read_text(encoding="utf-8") == real
    assert not write_code_deps(copy)  # a second run changes nothing


def test_the_writer_adds_code_dependencies_to_a_stage_that_lists_none() -> None:
    text = "stages:\n  ship:  # shipped\n    cmd: python -m stages.ship\n    deps:\n      - models/a.keras\n"
    new = with_code_deps(text)
    listed = yaml.safe_load(new)["stages"]["ship"]["deps"]
    assert listed == [*sorted(transitive_files("stages.ship")), "models/a.keras"] and with_code_deps(new) == new
    # A comment on a code dependency that is still needed stays; Windows line endings stay.
    commented = new.replace("- stages/ship.py\n", "- stages/ship.py  # the recipe\n").replace("\n", "\r\n")
    assert with_code_deps(commented) == commented


def test_no_stage_module_imports_another() -> None:
    """Shared code lives in the tlpipe library; a stage file is a recipe, and nothing else depends on it."""
    problems = []
    for file in sorted((PROJECT_ROOT / STAGE_PACKAGE).glob("*.py")):
        stage_imports = {m for m in imported_modules(file) if m.split(".")[0] == STAGE_PACKAGE}
        if stage_imports:
            problems.append(f"{file.name} imports {sorted(stage_imports)}")
    library_imports = {
        f"{file.name}: {m}"
        for file in sorted((PROJECT_ROOT / "tlpipe").glob("*.py"))
        for m in imported_modules(file)
        if m.split(".")[0] == STAGE_PACKAGE
    }
    assert not problems and not library_imports, problems + sorted(library_imports)


def test_the_import_walk_sees_lazy_and_package_imports() -> None:
    assert "tlpipe/pictures.py" in transitive_files("stages.train")  # `from tlpipe import pictures`
    assert {"stages/__init__.py", "tlpipe/__init__.py"} <= transitive_files("stages.validate")
    assert "tlpipe/backbones.py" in transitive_files("tlpipe.params")


def leaf_names(params: Any, prefix: str = "") -> set[str]:
    """Dotted names of every value in a params mapping that is not itself a mapping."""
    if not isinstance(params, dict):
        return {prefix}
    return {name for key, value in params.items() for name in leaf_names(value, f"{prefix}{key}.")} or {prefix}


def params_problems(stage: str, declared: list[str], reads: list[str], params: dict[str, Any]) -> list[str]:
    """What is wrong with a stage's `params:` given the names its code read (TL_PARAMS_TRACE).

    Every value read must be declared (else changing it would not rerun the stage), and every declared
    name must be needed: for a section, each of its entries must have been read (else changing an entry
    the stage ignores would rerun it for nothing).
    """

    def covered(name: str, by: str) -> bool:
        return name == by or name.startswith(f"{by}.")

    leaves = {name.rstrip(".") for name in leaf_names(params)}
    read_values = {name for name in reads if name in leaves or not any(covered(leaf, name) for leaf in leaves)}
    problems = [
        f"{stage} reads {name} but does not declare it"
        for name in sorted(read_values)
        if not any(covered(name, entry) for entry in declared)
    ]
    for entry in declared:
        children = {
            leaf.removeprefix(f"{entry}.").split(".")[0] for leaf in leaves if covered(leaf, entry) and leaf != entry
        }
        unread = sorted(child for child in children if not any(covered(r, f"{entry}.{child}") for r in reads))
        if entry not in reads and not any(covered(r, entry) for r in reads):
            problems.append(f"{stage} declares {entry} but never reads it")
        elif unread:
            problems.append(f"{stage} declares {entry} but reads none of {', '.join(f'{entry}.{c}' for c in unread)}")
    return problems


def test_params_check_finds_undeclared_and_unneeded_parameters() -> None:
    params = {"seed": 1, "train": {"epochs": 3, "dropout": 0.1}, "augment": {"flip": True}}
    assert params_problems("s", ["seed", "train"], ["seed", "train", "train.epochs", "train.dropout"], params) == []
    assert params_problems("s", ["seed"], ["seed", "train.epochs"], params) == [
        "s reads train.epochs but does not declare it"
    ]
    assert params_problems("s", ["seed", "augment"], ["seed"], params) == ["s declares augment but never reads it"]
    assert params_problems("s", ["train"], ["train", "train.epochs"], params) == [
        "s declares train but reads none of train.dropout"
    ]
    # A value read that is not in params.yaml (an optional key read with .get) still needs declaring.
    assert params_problems("s", [], ["train.optional"], params) == ["s reads train.optional but does not declare it"]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.test_dependencies",
        description="Check, or with --write rewrite, each dvc.yaml stage's code dependencies.",
    )
    parser.add_argument("--write", action="store_true", help="rewrite them to the modules each stage imports")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    path = PROJECT_ROOT / "dvc.yaml"
    if args.write:
        print(f"{path.name}: {'code dependencies rewritten' if write_code_deps(path) else 'unchanged'}")
        return 0
    problems = code_dep_problems(path.read_text(encoding="utf-8"))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"run `{WRITE_COMMAND}` to rewrite them", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
