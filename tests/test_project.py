"""Project-wide checks: lint, every entry point has --help, the README's commands match CI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scratchgpt.nn.model import PRESETS, GPTConfig

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(
    str(p.relative_to(REPO)) for p in [*REPO.glob("stages/*.py"), *REPO.glob("bench/*.py"), *REPO.glob("flows/*.py")]
)


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_has_help(script):
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


MODULE_ENTRY_POINTS = sorted(
    ".".join(p.relative_to(REPO / "src").with_suffix("").parts)
    for p in (REPO / "src" / "scratchgpt").rglob("*.py")
    if '__name__ == "__main__"' in p.read_text(encoding="utf-8")
)


@pytest.mark.parametrize("module", MODULE_ENTRY_POINTS)
def test_every_module_entry_point_has_help_naming_how_to_run_it(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:200]


def test_ci_runs_exactly_the_readme_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r"<!-- install -->\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    test = re.search(r"<!-- test -->\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert install in ci_lines
    assert test in ci_lines


def test_model_presets_listed_in_the_library_docs():
    library = (REPO / "docs" / "library.md").read_text(encoding="utf-8")
    presets_table = library[library.index("## Model presets") :]
    for name in PRESETS:
        assert f"| `{name}` |" in presets_table, name
        GPTConfig.from_name(name)
