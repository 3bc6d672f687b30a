"""Shared test set-up: offline switches for the tools, the data mirror, small model configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Server, free_port, stop_group, wait_healthy, write_tiny_params

from scratchgpt.data.sources import SOURCES

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tools must never try the network during tests (see ../shared/notes/stack-facts.md).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The venv's tools (dvc, prefect, mlflow, torchrun) for every subprocess, also when pytest runs as
# `.venv/bin/python -m pytest` without an activated environment (as CI does).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# The checksummed copies of the real downloads; CI sets this to ../shared/mirror.
MIRROR_SET = bool(os.environ.get("SCRATCHGPT_MIRROR"))
os.environ.setdefault("SCRATCHGPT_MIRROR", str(REPO_ROOT.parent / "shared" / "mirror"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop the session at once, with one message, when selected tests need a mirror that is not there.

    (Rather than each of them erroring on its own; tests that need no data still run without one.)
    """
    needing = sum("mirror_dir" in getattr(item, "fixturenames", ()) for item in session.items)
    problem = _mirror_problem(Path(os.environ["SCRATCHGPT_MIRROR"]).resolve()) if needing else None
    if problem:
        pytest.exit(
            f"{needing} selected test(s) need the data mirror, but {problem}.\n"
            "Point SCRATCHGPT_MIRROR at a directory holding the source files (e.g. SCRATCHGPT_MIRROR=../shared/mirror),"
            "\nor build one from the canonical URLs (network needed) and use it:\n"
            "    python -m scratchgpt.mirror DIR\n"
            "    SCRATCHGPT_MIRROR=DIR python -m pytest",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def _mirror_problem(path: Path) -> str | None:
    """Why `path` is not a usable mirror, or None (every source's file is there; hashes are checked by the tests)."""
    where = f"SCRATCHGPT_MIRROR={path}" if MIRROR_SET else f"SCRATCHGPT_MIRROR is not set and the default {path}"
    if not path.is_dir():
        return f"{where} does not exist"
    missing = sorted(s.basename for s in SOURCES.values() if not (path / s.basename).is_file())
    return f"{where} lacks {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """The data mirror (checked once for the whole session by `pytest_collection_finish`)."""
    return Path(os.environ["SCRATCHGPT_MIRROR"]).resolve()


class DvcProject:
    """A throw-away copy of this project as its own git + DVC repository."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def run(self, *args: str, timeout: float = 600, stdout_only: bool = False) -> str:
        """Run a command in the project; fail the test with its output if it fails. Returns its stdout and
        stderr together (`stdout_only`: stdout, e.g. for JSON)."""
        proc = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout if stdout_only else proc.stdout + proc.stderr


def make_dvc_project(repo: Path, mirror_dir: Path, mlflow_uri: str) -> DvcProject:
    """The pipeline (dvc.yaml, params.yaml, stages/, src/, presets/, the empty data/external/) copied into `repo`
    as a fresh, committed git + DVC repository, with the data mirror, MLflow at `mlflow_uri` and the venv's tools
    on PATH."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for name in ("stages", "src", "presets"):
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    (repo / "data" / "external").mkdir(parents=True)
    (repo / "data" / "external" / ".gitkeep").touch()
    env = dict(
        os.environ,
        SCRATCHGPT_MIRROR=str(mirror_dir),
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=mlflow_uri,
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


@pytest.fixture
def dvc_project(tmp_path: Path, mirror_dir: Path) -> DvcProject:
    """`make_dvc_project` in tmp_path/project, with an MLflow store in tmp_path."""
    return make_dvc_project(tmp_path / "project", mirror_dir, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="module")
def module_dvc_project(tmp_path_factory: pytest.TempPathFactory, mirror_dir: Path) -> DvcProject:
    """`dvc_project`, shared by the tests of one module (e.g. to run the pipeline once for all of them)."""
    root = tmp_path_factory.mktemp("dvc_project")
    return make_dvc_project(root / "project", mirror_dir, f"sqlite:///{root / 'mlflow.db'}")


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its URL, its SQLite backend store and its artifact destination."""

    url: str
    db: Path
    artifacts: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with a SQLite database and a local artifact destination (served over
    HTTP: `--serve-artifacts` is the default), healthy within 120 s, stopped by process group."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", root / "mlflow.db", root / "artifacts")
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
           f"sqlite:///{server.db}", "--artifacts-destination", str(server.artifacts)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(proc, f"{server.url}/health", root / "server.log", timeout=120)
        yield server
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def tiny_pipeline(
    tmp_path_factory: pytest.TempPathFactory, mirror_dir: Path, mlflow_server: MlflowServer
) -> DvcProject:
    """The whole pipeline with `helpers.TINY_PIPELINE` params, run once by `dvc repro` in a `make_dvc_project`
    copy tracking to `mlflow_server` over HTTP; then everything git tracks (dvc.lock, params.yaml, metrics,
    plots, reports, DVC's .gitignore files) is committed. Tests may add commits and DVC config, not rerun stages."""
    project = make_dvc_project(tmp_path_factory.mktemp("tiny_pipeline") / "project", mirror_dir, mlflow_server.url)
    write_tiny_params(project.path)
    project.run("dvc", "repro", timeout=900)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny pipeline reproduced")
    return project


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[Server]:
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME, healthy within 120 s."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_healthy(proc, f"{url}/health", home / "server.log", timeout=120)
        yield Server(url, home, {**env, "PREFECT_API_URL": url})
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def cls_project(tmp_path_factory: pytest.TempPathFactory, mirror_dir: Path) -> DvcProject:
    """The tiny pipeline reproduced up to lora-cls-finetune and committed, with a local MLflow store: the baseline
    of the classifier's DVC experiments (tests/test_compare.py) and sweeps (tests/test_sweep.py), made once. Tests
    add experiments and their runs; the names they use are their own (`cls-MODE`, `<sweep>-...`)."""
    root = tmp_path_factory.mktemp("cls_project")
    project = make_dvc_project(root / "project", mirror_dir, f"sqlite:///{root / 'mlflow.db'}")
    write_tiny_params(project.path)
    with (project.path / ".gitignore").open("a") as f:
        f.write("/reports/sweeps/\n")  # as this repository's .gitignore has it
    project.run("dvc", "repro", "lora-cls-finetune", timeout=900)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny pipeline up to the classifier")
    return project
