"""Helpers shared by test modules (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "scratchgpt"


def module_file(name: str) -> Path | None:
    """The file of the scratchgpt module `name` (dotted), or None when it is no module of ours."""
    parts = name.split(".")
    if parts[0] != "scratchgpt":
        return None
    path = PACKAGE.joinpath(*parts[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[Path]:
    """The files of the scratchgpt modules that `path` imports anywhere in its body (lazy imports too).

    `from scratchgpt.a import b` counts `scratchgpt.a.b` when that is a module, else `scratchgpt.a`;
    a package's `__init__` (which holds only a docstring) counts only where it is imported as such.
    Imports under `if TYPE_CHECKING:` run no code and do not count.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [sub if module_file(sub) else node.module for sub in subs]
        else:
            continue
        found |= {f for f in map(module_file, names) if f is not None}
    return found


def load_stage(name: str) -> ModuleType:
    """Import `stages/<name>.py` as a module, to call its `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The whole pipeline in under a minute on 2 cores: 16-token pretraining windows, a one-layer 32-wide model
# (context 96, so instruction prompts fit) trained for 18 steps with a checkpoint every 5 (a run can be
# killed between checkpoints), one epoch of last-block classification and of instruction tuning.
TINY_PIPELINE = {
    "sample": {"max_length": 16, "stride": 64},
    "pretrain": {"sample_tokens": 5, "model": {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 96},
                 "train": {"epochs": 2, "batch_size": 8, "eval_freq": 5, "eval_iter": 1, "final_eval_iter": 2,
                           "checkpoint_every": 5}},
    "load_gpt2": {"sample_tokens": 5},
    "cls": {"mode": "last-block", "train": {"epochs": 1, "batch_size": 32, "eval_freq": 50, "eval_iter": 1,
                                            "final_eval_iter": 2, "checkpoint_every": 0}},
    "instruct": {"allowed_max_length": 64, "max_new_tokens": 4, "generate_batch_size": 64,
                 "train": {"epochs": 1, "batch_size": 32, "eval_freq": 50, "eval_iter": 1, "final_eval_iter": 2,
                           "checkpoint_every": 0}},
    "evaluate": {"batch_size": 64},
}  # fmt: skip


def deep_update(d: dict, u: dict) -> dict:
    """`d` with `u`'s values written into it, nested dicts merged key by key."""
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def write_tiny_params(project: Path, extra: dict | None = None) -> None:
    """Rewrite `project`/params.yaml with TINY_PIPELINE (and `extra`) merged into it."""
    path = project / "params.yaml"
    params = deep_update(deep_update(yaml.safe_load(path.read_text()), TINY_PIPELINE), extra or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """End a process started with start_new_session=True, and its children: SIGTERM to its group, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the end of `log` if `proc` exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        assert time.monotonic() < deadline, f"{url} not healthy in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@dataclasses.dataclass
class Server:
    """A running `prefect server start` (conftest's `prefect_server`)."""

    url: str
    home: Path
    env: dict[str, str]  # what a Prefect client process needs to talk to it


@contextlib.contextmanager
def prefect_settings(server: Server):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_HOME: str(server.home)}):
        yield


@contextlib.contextmanager
def prefect_client(server: Server):
    from prefect.client.orchestration import get_client

    with prefect_settings(server), get_client(sync_client=True) as client:
        yield client
