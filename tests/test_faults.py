"""Faults never hold a finished result hostage (docs/faults.md), each reproduced for real: a tracking store
with nothing listening, a real `mlflow server` killed with SIGKILL mid-run, a file-size limit (RLIMIT_FSIZE:
EFBIG) while a checkpoint is written, and truncated checkpoints, bases, Parquet splits and model
directories. Each ends in one clear line, and what was finished is kept."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import free_port, wait_healthy
from test_cls_finetune import TINY, set_cls, spam_splits, workdir  # noqa: F401  (fixtures)

from scratchgpt.plumbing import tracking
from scratchgpt.train.state import read_trainer_state

REPO = Path(__file__).resolve().parents[1]
TRACKED_STAGES = ("pretrain", "load_gpt2", "lora_cls_finetune", "instruct_finetune", "evaluate")
CKPT = Path("models/spam-classifier-ckpt")


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SCRATCHGPT_TRACKING"}
    return {**env, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO / "src"), **extra}


def error_lines(stderr: str) -> list[str]:
    return [line.split(" ERROR ", 1)[1] for line in stderr.splitlines() if " ERROR " in line]


# --- a tracking store that is not there ---------------------------------------------------------


@pytest.mark.parametrize("name", TRACKED_STAGES)
def test_an_unreachable_tracking_store_fails_every_tracked_stage_before_any_work(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    from helpers import load_stage

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("SCRATCHGPT_TRACKING", raising=False)
    with pytest.raises(SystemExit):
        load_stage(name).main([])
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"MLflow tracking store {url} is not reachable (connection refused, after "), line
    assert "start the tracking server" in line and "SCRATCHGPT_TRACKING=0" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no work was done, nothing written


def test_the_issue_case_a_stage_with_its_tracking_server_down_exits_in_one_line(tmp_path: Path):
    """`python stages/lora_cls_finetune.py` with nothing at the tracking URI: 250 s of MLflow's retries and
    five chained tracebacks before; now one line, the check itself within CHECK_TIMEOUT_S."""
    url = f"http://127.0.0.1:{free_port()}"
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    started = time.monotonic()
    cmd = [sys.executable, str(REPO / "stages" / "lora_cls_finetune.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=stage_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    waited = float(re.search(r"after ([\d.]+) s\)", line)[1])
    assert line.startswith(f"MLflow tracking store {url} is not reachable") and waited <= tracking.CHECK_TIMEOUT_S
    print(f"lora_cls_finetune with its tracking server down: exit 1 after {took:.1f} s (the check: {waited:.1f} s)")


def test_the_store_check_waits_at_most_its_bound_for_a_server_that_never_answers():
    with socket.socket() as listener:  # connections are accepted by the kernel, and never answered
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError, match=rf"{url} is not reachable \(timed out, after "):
            tracking.check_store(url)
        took = time.monotonic() - started
    assert took <= tracking.CHECK_TIMEOUT_S + 1, f"the check waited {took:.1f} s"  # MLflow's own retries: 32 s


def test_tracking_off_needs_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SCRATCHGPT_TRACKING", "0")
    tracking.check_store()  # the one switch: nothing is checked or contacted
    monkeypatch.delenv("SCRATCHGPT_TRACKING")
    with pytest.raises(tracking.TrackingError, match="not reachable"):
        tracking.check_store()
    tracking.check_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a local store that can be made
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "blocked").write_text("a file where the store's directory would go")
    with pytest.raises(tracking.TrackingError, match=r"blocked is not a directory this process may write"):
        tracking.check_store(f"sqlite:///{tmp_path / 'blocked' / 'mlflow.db'}")


# --- a tracking server that dies while the stage runs -------------------------------------------


class MlflowServerProcess:
    """`mlflow server` on a fixed port and SQLite store, which a test can kill (SIGKILL) and start again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        wait_healthy(self.proc, f"{self.url}/health", self.root / "server.log", timeout=120)

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its workers."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServerProcess]:
    srv = MlflowServerProcess(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    try:
        yield srv
    finally:
        if srv.running:
            srv.kill()


def client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.heavy
def test_logging_in_the_background_never_holds_up_the_caller_and_catches_up_or_fails_at_the_end(
    server: MlflowServerProcess, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("SCRATCHGPT_TRACKING", raising=False)
    # the server dies and stays dead: the caller goes on; the end fails in seconds, in one TrackingError
    with pytest.raises(tracking.TrackingError) as raised, tracking.stage_run("pretrain", {"a": 1}) as run:
        run.log_metrics({"loss": 3.0}, step=1, synchronous=False)
        run.flush()
        server.kill()
        started = time.monotonic()
        for step in range(2, 12):  # what a training loop logs while the store is gone
            run.log_metrics({"loss": 3.0 - step / 10}, step=step, synchronous=False)
        assert time.monotonic() - started < 0.5
        wait_for(lambda: run.failed, 30, "the background logging notices the dead server")
        ending = time.monotonic()
    took = time.monotonic() - ending
    message = str(raised.value)
    assert message.startswith(f"MLflow tracking at {server.url} failed while logging metrics (connection refused)")
    assert "rerun the stage" in message and "SCRATCHGPT_TRACKING=0" in message
    assert took < 15, f"the end of the run waited {took:.1f} s for a dead store"
    print(f"a dead store at the end of a run: TrackingError after {took:.1f} s")

    # the server comes back before the run ends: the held calls are made then, nothing is lost
    server.start()
    with tracking.stage_run("pretrain", {"a": 1}) as run:
        run.log_metrics({"loss": 3.0}, step=1, synchronous=False)
        run.flush()
        server.kill()
        for step in range(2, 12):
            run.log_metrics({"loss": 3.0 - step / 10}, step=step, synchronous=False)
        wait_for(lambda: run.failed, 30, "the background logging notices the dead server")
        server.start()
    finished = client(server.url).get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in client(server.url).get_metric_history(run.run_id, "loss")]
    assert sorted(steps) == list(range(1, 12))


@pytest.mark.slow
@pytest.mark.heavy
def test_a_tracking_server_killed_mid_training_costs_no_result(workdir: Path, server: MlflowServerProcess):  # noqa: F811
    """The issue's second case: training goes on, the outputs are written, the stage fails in one line (DVC
    records nothing MLflow lacks), and the rerun reuses the finished checkpoint and logs in seconds."""
    if not server.running:
        server.start()
    set_cls(workdir, {"train": {"epochs": 3}})
    cmd = [sys.executable, "stages/lora_cls_finetune.py"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=stage_env(MLFLOW_TRACKING_URI=server.url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    wait_for(lambda: any("(step 000001)" in line for line in lines) or proc.poll() is not None, 300,
             "the first evaluation")  # fmt: skip
    server.kill()
    killed = time.monotonic()
    proc.wait(timeout=600)
    took = time.monotonic() - killed
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 1, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    (line,) = error_lines(stderr)
    assert line.startswith(f"MLflow tracking at {server.url} failed while "), line
    assert "(connection refused)" in line and "outputs written so far are kept" in line, line
    assert "going on without it" in stderr  # the warning when it happened, training went on
    state = read_trainer_state(workdir / CKPT)
    assert state["finished"] and state["step"] == 36
    assert (workdir / "models" / "spam-classifier" / "model.safetensors").is_file()
    metrics = json.loads((workdir / "metrics" / "cls.json").read_text())
    assert metrics["session_steps"] == 36
    assert all((workdir / "plots" / name).is_file() for name in ("cls_loss.png", "cls_accuracy.png"))
    print(f"server killed at step 1: the stage ended {took:.1f} s later, outputs written, exit 1")

    server.start()
    started = time.monotonic()
    rerun = subprocess.run(cmd, cwd=workdir, env=stage_env(MLFLOW_TRACKING_URI=server.url), capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    rerun_took = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert json.loads((workdir / "metrics" / "cls.json").read_text())["session_steps"] == 0  # reused, not trained
    mlflow = client(server.url)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("scratchgpt").experiment_id],
                                filter_string="tags.dvc_stage = 'lora-cls-finetune' and attributes.status = 'FINISHED'")
    logged = [m.step for m in mlflow.get_metric_history(run.info.run_id, "train_loss")]
    assert logged == [int(r["step"]) for r in state["history"]]  # the whole curve, from the checkpoint
    assert mlflow.search_model_versions("name = 'spam-classifier'")  # registered
    print(f"rerun with the server back: exit 0 in {rerun_took:.1f} s (training reused, run complete)")


# --- a full disk --------------------------------------------------------------------------------

FSIZE_CHILD = """
import resource, sys
from pathlib import Path
from scratchgpt.plumbing import fileio
out = Path(sys.argv[1])
fileio.write_text(out / "metrics.json", "old")
with fileio.atomic_dir(out / "ckpt") as tmp:
    (tmp / "weights").write_bytes(b"old")
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    fileio.write_bytes(out / "metrics.json", b"x" * 200_000)
except fileio.DiskFullError as exc:
    print("file:", exc)
try:
    with fileio.atomic_dir(out / "ckpt") as tmp:
        (tmp / "weights").write_bytes(b"x" * 200_000)
except fileio.DiskFullError as exc:
    print("dir:", exc)
"""


def test_a_write_past_the_file_size_limit_leaves_the_previous_output_and_no_temporary(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)], env=stage_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    file_line, dir_line = proc.stdout.splitlines()
    assert file_line.startswith(f"file: cannot write {tmp_path / 'metrics.json'}: the disk is full for a file this")
    assert dir_line.startswith(f"dir: cannot write {tmp_path / 'ckpt'}: the disk is full")
    assert f"in {tmp_path}" in dir_line and "nothing half-written remains" in dir_line
    assert (tmp_path / "metrics.json").read_text() == "old" and (tmp_path / "ckpt" / "weights").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "metrics.json"]


def _limit_file_size(limit: int):
    def preexec() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
@pytest.mark.heavy
def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(workdir: Path):  # noqa: F811
    cmd = [sys.executable, "stages/lora_cls_finetune.py"]
    env = stage_env(SCRATCHGPT_TRACKING="0")
    set_cls(workdir, {"train": {"epochs": 1}})
    first = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (workdir / CKPT).iterdir()}
    weights = len(before["model.safetensors"])

    set_cls(workdir, {"train": {"epochs": 2}})  # other params: trains afresh, checkpoints at step 5
    full = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_file_size(weights // 2))  # fmt: skip
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    (line,) = error_lines(full.stderr)
    assert line.startswith(f"cannot write {CKPT}: the disk is full"), line
    assert f"in {(workdir / CKPT).parent.resolve()}" in line, line
    after = {p.name: p.read_bytes() for p in (workdir / CKPT).iterdir()}
    assert after == before  # the previous checkpoint, byte for byte
    assert read_trainer_state(workdir / CKPT)["finished"]  # and loadable
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["base", "spam-classifier", "spam-classifier-ckpt"]


# --- truncated files ------------------------------------------------------------------------------


def truncate(path: Path) -> bytes:
    """Cut `path` to half its size (a copy cut short); returns the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def run_cls_stage(caplog) -> str | None:
    """The stage in this process: None when it succeeds, else its one ERROR line."""
    from helpers import load_stage

    caplog.clear()
    try:
        load_stage("lora_cls_finetune").main([])
    except SystemExit:
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        return record.getMessage()
    return None


@pytest.mark.slow
@pytest.mark.heavy
def test_a_truncated_checkpoint_file_stops_the_stage_with_the_ways_on(workdir: Path, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SCRATCHGPT_REGISTER", "0")  # not what is tested; it takes seconds
    set_cls(workdir, {"train": {"epochs": 1}})
    assert run_cls_stage(caplog) is None
    for name in ("model.safetensors", "trainer_state.pt"):
        path = workdir / CKPT / name
        original = truncate(path)
        cut = path.read_bytes()
        message = run_cls_stage(caplog)
        assert message is not None and message.startswith(f"{CKPT / name} is truncated or corrupt ("), message
        assert f"`dvc checkout --force {CKPT}`" in message and "`resume: never`" in message, message
        assert path.read_bytes() == cut  # neither used nor overwritten
        assert "training from scratch" not in caplog.text
        path.write_bytes(original)
    assert run_cls_stage(caplog) is None  # restored: reused as it was
    assert json.loads((workdir / "metrics" / "cls.json").read_text())["session_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "producer"),
    [("models/base/model.safetensors", "load-gpt2"), ("models/base/config.json", "load-gpt2"),
     ("data/processed/cls/train.parquet", "sample-to-parquet"),
     ("data/processed/cls/test.parquet", "sample-to-parquet")],
)  # fmt: skip
def test_a_truncated_input_names_the_file_and_the_stage_that_makes_it(workdir: Path, caplog, path, producer):  # noqa: F811
    truncate(workdir / path)
    message = run_cls_stage(caplog)
    assert message is not None and message.startswith(f"{path} is truncated or corrupt ("), message
    assert f"`dvc repro {producer}`" in message and "`dvc checkout --force " in message, message
    assert not (workdir / CKPT).exists()  # before any training


def test_classify_and_chat_name_a_truncated_model_file(tmp_path: Path, mirror_dir: Path):
    from scratchgpt.apps.classify import ClassifierInfo, attach_head, save_classifier
    from scratchgpt.nn.checkpoint import save_model
    from scratchgpt.nn.model import GPTConfig, GPTModel

    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)
    torch.manual_seed(0)
    save_classifier(attach_head(GPTModel(cfg), 2), tmp_path / "clf", ClassifierInfo(("ham", "spam"), "last-token", 32,
                    None), vocab_dir=mirror_dir)  # fmt: skip
    save_model(GPTModel(cfg), tmp_path / "chat")
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, tmp_path / "chat" / name)
    from scratchgpt.apps import chat, classify

    cases = [(classify.main, "clf", ["hello"], "dvc repro lora-cls-finetune"),
             (chat.main, "chat", ["--once", "hello"], "dvc repro instruct-finetune")]  # fmt: skip
    for command, model, args, maker in cases:
        for name in ("model.safetensors", "config.json"):
            original = truncate(tmp_path / model / name)
            with pytest.raises(SystemExit) as exited:  # a message: Python prints it as one line and exits 1
                command(["--model", str(tmp_path / model), *args])
            (line,) = str(exited.value.code).splitlines()
            assert line.startswith("error: ") and f"{tmp_path / model / name} is truncated or corrupt" in line, line
            assert f"`{maker}`" in line, line
            (tmp_path / model / name).write_bytes(original)
        command(["--model", str(tmp_path / model), *args])  # restored: it answers
