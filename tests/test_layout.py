"""The package's layout stays true: layered groups, no import cycles, one pipeline module per DVC stage.

The groups, lowest first: plumbing < data < nn < train < apps < pipeline < the top-level modules
(orchestration, compare, presets and the command aliases). A module may import its own group and
the ones below it, never one above. The graph is read statically, lazy imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import PACKAGE, REPO, imported_modules

GROUPS = ("plumbing", "data", "nn", "train", "apps", "pipeline", "top")


def group_of(module: str) -> str:
    """`nn/model.py` -> nn; a top-level module (`compare.py`) -> top."""
    parts = Path(module).parts
    return parts[0] if len(parts) > 1 else "top"


def import_graph() -> dict[str, set[str]]:
    """Module (path relative to the package) -> the modules it imports; packages' `__init__` left out
    (they hold only docstrings: `test_package_inits_hold_only_a_docstring`)."""
    def name(path: Path) -> str:
        return str(path.relative_to(PACKAGE))

    files = [f for f in PACKAGE.rglob("*.py") if f.name != "__init__.py"]
    return {name(f): {name(d) for d in imported_modules(f) if d.name != "__init__.py"} for f in files}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = GROUPS.index
    return [
        f"{m} ({group_of(m)}) imports {d} ({group_of(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if rank(group_of(d)) > rank(group_of(m))
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk; empty when the graph has none."""
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_is_in_a_group():
    for module in import_graph():
        assert group_of(module) in GROUPS, module
        assert len(Path(module).parts) <= 2, f"{module}: one level of subpackages only"


def test_no_module_imports_from_a_group_above_its_own():
    assert upward_imports(import_graph()) == []


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = import_graph()
    graph["plumbing/fileio.py"] = graph["plumbing/fileio.py"] | {"train/trainer.py"}
    assert upward_imports(graph) == ["plumbing/fileio.py (plumbing) imports train/trainer.py (train)"]
    assert any("plumbing/fileio.py" in c and "train/trainer.py" in c for c in cycles(graph))  # trainer imports fileio
    assert cycles({"a.py": {"b.py"}, "b.py": {"a.py"}}) == [["a.py", "b.py", "a.py"]]


def test_package_inits_hold_only_a_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init
        rest = body[1:]
        if init.parent == PACKAGE:  # the root also holds the version string
            assert [ast.unparse(n).split(" = ")[0] for n in rest] == ["__version__"]
        else:
            assert rest == [], f"{init}: nothing but a docstring (code here would run for every module below it)"


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_a_pipeline_module_named_after_it_that_its_script_calls(stage: str):
    name = stage.replace("-", "_")
    module = PACKAGE / "pipeline" / f"{name}.py"
    assert module.is_file(), f"stage {stage!r}: no src/scratchgpt/pipeline/{name}.py"
    tree = ast.parse(module.read_text(encoding="utf-8"))
    assert f"run_{name}" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, module
    script = REPO / STAGES[stage]["cmd"].split()[-1]
    called = {
        n.func.id for n in ast.walk(ast.parse(script.read_text(encoding="utf-8")))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }  # fmt: skip
    assert f"run_{name}" in called, f"{script.relative_to(REPO)} does not call run_{name}()"
    assert module in imported_modules(script)


def test_pipeline_holds_only_stage_modules_and_what_they_share():
    shared = {"stage", "report", "judge", "openai_judge"}
    stage_modules = {s.replace("-", "_") for s in STAGES}
    found = {p.stem for p in (PACKAGE / "pipeline").glob("*.py")} - {"__init__"}
    assert found - stage_modules - shared == set()
