"""Shared test set-up: offline switches for the tools, the data mirror, small model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tools must never try the network during tests (see ../shared/notes/stack-facts.md).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The checksummed copies of the real downloads; CI sets this to ../shared/mirror.
os.environ.setdefault("SCRATCHGPT_MIRROR", str(REPO_ROOT.parent / "shared" / "mirror"))


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """The data mirror; fails loudly (never skips) when it is not there."""
    path = Path(os.environ["SCRATCHGPT_MIRROR"]).resolve()
    if not (path / "vocab.bpe").is_file():
        pytest.fail(f"SCRATCHGPT_MIRROR={path} does not hold the mirrored files (vocab.bpe missing)")
    return path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One MLflow SQLite store per test session (a fresh DB costs ~2 s of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_env(mlflow_store, monkeypatch) -> str:
    """Point scratchgpt.tracking (and child processes that inherit os.environ) at the session's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    for name in ("MLFLOW_RUN_ID", "SCRATCHGPT_MLFLOW_PARENT_RUN_ID", "SCRATCHGPT_TRACKING", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return mlflow_store
