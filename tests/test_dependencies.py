"""dvc.yaml declares exactly what each stage reads: the project modules its command imports (checked here,
statically) and the parameters its code reads (checked against a real run in test_pipeline_e2e.py)."""

from __future__ import annotations

import ast
import re
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


def stage_templates() -> dict[str, dict]:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def stage_module(stage: dict) -> str:
    return re.match(r"python -m (stages\.\w+)", stage["cmd"]).group(1)


def test_every_stage_lists_exactly_the_project_modules_it_imports() -> None:
    problems = []
    for name, stage in stage_templates().items():
        needed = transitive_files(stage_module(stage))
        listed = {dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.split("/")[0] in PACKAGES}
        if missing := needed - listed:
            problems.append(f"{name} does not list {sorted(missing)}")
        if extra := listed - needed:
            problems.append(f"{name} lists {sorted(extra)}, which it does not import")
    assert not problems, "\n".join(problems)


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
