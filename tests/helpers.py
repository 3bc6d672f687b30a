"""Helpers shared by test modules (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_stage(name: str) -> ModuleType:
    """Import `stages/<name>.py` as a module, to call its `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
