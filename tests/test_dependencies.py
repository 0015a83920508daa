"""dvc.yaml lists exactly the project modules each stage's command imports, so a code change reruns it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.helpers import PROJECT_ROOT

PACKAGE = "stages"


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not a project module."""
    path = PROJECT_ROOT / Path(*module.split("."))
    if (file := path.with_suffix(".py")).is_file():
        return file
    if (init := path / "__init__.py").is_file():
        return init
    return None


def imported_modules(file: Path) -> set[str]:
    """Every `stages` module the file imports, at any depth of its code (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from stages import pictures`
    return {name for name in found if name.split(".")[0] == PACKAGE and module_file(name)}


def transitive_files(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module, PACKAGE]  # `python -m stages.x` runs stages/__init__.py first
    while todo:
        name = todo.pop()
        file = module_file(name)
        relative = file.relative_to(PROJECT_ROOT).as_posix() if file else None
        if relative is None or relative in seen:
            continue
        seen.add(relative)
        todo += imported_modules(file)
    return seen


def stage_templates() -> dict[str, dict]:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def test_every_stage_lists_exactly_the_project_modules_it_imports() -> None:
    problems = []
    for name, stage in stage_templates().items():
        module = re.match(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        needed = transitive_files(module)
        listed = {dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.startswith(f"{PACKAGE}/")}
        if missing := needed - listed:
            problems.append(f"{name} does not list {sorted(missing)}")
        if extra := listed - needed:
            problems.append(f"{name} lists {sorted(extra)}, which it does not import")
    assert not problems, "\n".join(problems)


def test_the_import_walk_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    assert "stages/pictures.py" in transitive_files("stages.train")  # `from stages import pictures`
    assert "stages/__init__.py" in transitive_files("stages.validate")
    assert "stages/backbones.py" in transitive_files("stages.params")
