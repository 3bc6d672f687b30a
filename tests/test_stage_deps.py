"""dvc.yaml lists, for every stage, exactly the project code the stage's script runs.

A training stage's checkpoint fingerprint hashes the `.py` deps dvc.yaml lists for it
(`scratchgpt.pipeline.stage.code_digest`), so a module missing there would let DVC skip a needed rerun,
or let a rerun resume a checkpoint the old code made. The import graph is read statically (every
`import`, at any depth in a module, counts), so lazily imported modules are included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import imported_modules

from scratchgpt.pipeline.stage import StageError, code_deps, code_digest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "scratchgpt"
# The packages' __init__ files hold only a docstring (and the root's the version; tests/test_layout.py checks
# it): a version bump or a reworded package docstring must not retrain the pipeline.
NOT_CODE_DEPS = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("__init__.py")}


def import_closure(script: Path) -> set[str]:
    """Repository-relative paths of the project modules `script` runs, transitively."""
    todo, seen = [script], set()
    while todo:
        for module in imported_modules(todo.pop()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return {str(script.relative_to(REPO))} | {str(m.relative_to(REPO)) for m in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_dvc_yaml_code_deps_are_exactly_what_the_stage_imports(stage: str):
    script = REPO / stages()[stage]["cmd"].split()[-1]
    assert script.suffix == ".py" and script.is_file(), stages()[stage]["cmd"]
    listed = set(code_deps(stage, REPO))
    needed = import_closure(script) - NOT_CODE_DEPS
    assert not needed - listed, f"dvc.yaml: stage {stage!r} lacks code deps {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml: stage {stage!r} lists code it does not run: {sorted(listed - needed)}"


def test_the_fingerprint_hashes_exactly_the_code_dvc_watches(tmp_path: Path):
    digest = code_digest("pretrain", REPO)
    assert set(digest) == set(code_deps("pretrain", REPO))
    assert "src/scratchgpt/data/datasets.py" in digest and "stages/pretrain.py" in digest

    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python s.py\n    deps: [s.py, data]\n")
    (tmp_path / "s.py").write_text("print(1)\n")
    before = code_digest("s", tmp_path)
    (tmp_path / "s.py").write_text("print(1)  # a comment is a change DVC sees too\n")
    assert code_digest("s", tmp_path) != before
    with pytest.raises(StageError, match="no stage 'nope'"):
        code_digest("nope", tmp_path)
    (tmp_path / "s.py").unlink()
    with pytest.raises(StageError, match="do not exist"):
        code_digest("s", tmp_path)


def test_the_closure_finds_lazy_imports(tmp_path: Path):
    assert "src/scratchgpt/nn/generate.py" in import_closure(REPO / "stages" / "pretrain.py")
