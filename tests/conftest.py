"""Shared test set-up: offline switches for the tools, the data mirror, small model configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


class DvcProject:
    """A throw-away copy of this project as its own git + DVC repository."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def run(self, *args: str, timeout: float = 600) -> str:
        """Run a command in the project; fail the test with its output if it fails."""
        proc = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout + proc.stderr


@pytest.fixture
def dvc_project(tmp_path: Path, mirror_dir: Path) -> DvcProject:
    """The pipeline (dvc.yaml, params.yaml, stages/, src/, presets/) copied into a fresh, committed git + DVC
    repository, with the data mirror, an MLflow store in tmp_path and the venv's tools on PATH."""
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for name in ("stages", "src", "presets"):
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    env = dict(
        os.environ,
        SCRATCHGPT_MIRROR=str(mirror_dir),
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("SCRATCHGPT_PROJECT_ROOT", "SCRATCHGPT_MLFLOW_PARENT_RUN_ID", "MLFLOW_RUN_ID", "DVC_ROOT"):
        env.pop(name, None)
    project = DvcProject(repo, env)
    project.run("git", "init", "-q")
    project.run("dvc", "init", "-q")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "project")
    return project
