"""tlpipe/paths.py and dvc.yaml name the same paths: every data path a stage of dvc.yaml declares is one the
code spells in tlpipe/paths.py, and every path there is one dvc.yaml declares (or is listed below, with why
it is not). A typo on either side would otherwise make DVC track a file no stage writes, or a stage write a
file DVC never checks."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import yaml

from tests.helpers import PROJECT_ROOT
from tests.test_dependencies import is_code_dep
from tlpipe import paths

KEY = "${key}"  # how dvc.yaml's foreach stages spell a backbone; ${model} names one too
# Paths in tlpipe/paths.py that no stage declares, and why.
NOT_IN_DVC_YAML = {
    paths.PARTIAL_DIR.as_posix(): "fetch's partial download, resumed by its next run: never a stage's output",
}
# Files a library names inside a folder of tlpipe/paths.py: DVCLive's in a training log folder
# (tlpipe/progress.py), which the project's code never spells.
WRITTEN_BY_LIBRARIES = {"metrics.json", "plots/metrics"}


def code_paths() -> set[str]:
    """Every path tlpipe/paths.py produces: its constants, and its functions called with a backbone
    placeholder (and, where the parameter is `name`, with the shipped model's name too)."""
    found = {value.as_posix() for value in vars(paths).values() if isinstance(value, Path)}
    for function in (f for _, f in inspect.getmembers(paths, inspect.isfunction) if f.__module__ == paths.__name__):
        (parameter,) = inspect.signature(function).parameters
        found.add(function(KEY).as_posix())
        if parameter == "name":
            found.add(function(paths.SHIPPED_NAME).as_posix())
    return found


def declared_paths(text: str) -> dict[str, str]:
    """Every data path a dvc.yaml declares (deps that are not code or params.yaml, outs, metrics, plots,
    artifacts), ${model} spelled as ${key}, each with where it was found."""
    document = yaml.safe_load(text)
    found: dict[str, str] = {}
    for name, spec in document["stages"].items():
        stage = spec.get("do", spec)
        for field in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(field, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if field == "deps" and (is_code_dep(path) or path == "params.yaml"):
                    continue
                found.setdefault(path.replace("${model}", KEY), f"{name} {field}")
    for name, artifact in document.get("artifacts", {}).items():
        found.setdefault(artifact["path"], f"artifact {name}")
    return found


def string_literals() -> set[str]:
    """Every string constant of the project's code outside tlpipe/paths.py: the file names it writes."""
    files = [*sorted((PROJECT_ROOT / "stages").glob("*.py")), *sorted((PROJECT_ROOT / "tlpipe").glob("*.py"))]
    return {
        node.value
        for file in files
        if file.name != "paths.py"
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def inside(path: str, folder: str) -> bool:
    return path.startswith(f"{folder}/")


def undeclared_in_code(declared: dict[str, str], code: set[str], names: set[str]) -> list[str]:
    """dvc.yaml's paths that tlpipe/paths.py does not produce. Also accepted: a folder output that holds a
    path of it (models/${key}), and a file the code names inside one of its folders
    (reports/audit/duplicates.csv: "duplicates.csv" in stages/audit.py)."""
    return [
        f"dvc.yaml ({where}) names {path}, which tlpipe/paths.py does not produce"
        for path, where in sorted(declared.items())
        if path not in code
        and not any(inside(known, path) for known in code)
        and not any(inside(path, known) and path[len(known) + 1 :] in names for known in code)
    ]


def undeclared_in_dvc_yaml(declared: dict[str, str], code: set[str]) -> list[str]:
    """tlpipe/paths.py's paths that dvc.yaml does not declare, itself, as a folder of declared paths, or as
    a file inside a declared folder (models/${key}/head.keras)."""
    return [
        f"tlpipe/paths.py produces {path}, which dvc.yaml does not declare (or list it in NOT_IN_DVC_YAML)"
        for path in sorted(code - NOT_IN_DVC_YAML.keys())
        if path not in declared
        and not any(inside(known, path) for known in declared)
        and not any(inside(path, known) for known in declared)
    ]


def test_dvc_yaml_and_tlpipe_paths_name_the_same_paths() -> None:
    declared = declared_paths((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    code = code_paths()
    problems = undeclared_in_code(declared, code, string_literals() | WRITTEN_BY_LIBRARIES)
    problems += undeclared_in_dvc_yaml(declared, code)
    assert not problems, "\n".join(problems)
    assert NOT_IN_DVC_YAML.keys() <= code, "NOT_IN_DVC_YAML lists a path tlpipe/paths.py no longer produces"


def test_a_misspelled_path_on_either_side_is_found() -> None:
    text = (PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    names = string_literals() | WRITTEN_BY_LIBRARIES
    code = code_paths()
    misspelled = declared_paths(text.replace("/out_of_fold.csv", "/out_of_folds.csv"))
    assert undeclared_in_code(misspelled, code, names) == [
        "dvc.yaml (evaluate deps) names reports/crossval/${key}/out_of_folds.csv, which tlpipe/paths.py does "
        "not produce"
    ]
    renamed = declared_paths(text.replace("reports/audit/duplicates.csv", "reports/audit/duplicate.csv"))
    assert len(undeclared_in_code(renamed, code, names)) == 1
    moved = (code - {paths.AUDIT_METRICS.as_posix()}) | {"metrics/audits.json"}
    assert undeclared_in_dvc_yaml(declared_paths(text), moved) == [
        "tlpipe/paths.py produces metrics/audits.json, which dvc.yaml does not declare (or list it in NOT_IN_DVC_YAML)"
    ]


def test_the_list_of_dropped_test_images_is_spelled_once_in_dvc_yaml() -> None:
    """Declared by the audit and read by every evaluation: one spelling (a YAML anchor), the rest aliases."""
    text = (PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert text.count(paths.DROPPED_TEST.as_posix()) == 1
    stages = yaml.safe_load(text)["stages"]
    readers = [name for name, spec in stages.items() if paths.DROPPED_TEST.as_posix() in spec.get("do", spec)["deps"]]
    assert readers == ["evaluate", "evaluate_model", "export"]
    assert paths.DROPPED_TEST.as_posix() in stages["audit"]["outs"][0]
