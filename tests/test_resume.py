"""Kill training with a real SIGKILL, resume, and end with bit-identical weights and the same batches.

Each run is a real subprocess (`train_child.py` below). The child logs the sample indices of every
optimizer step and prints a line after each checkpoint, so the test can kill it mid-training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from scratchgpt.nn.checkpoint import read_safetensors
from scratchgpt.train.state import STATE_FILE, WEIGHTS_FILE, find_checkpoint, read_trainer_state

pytestmark = pytest.mark.slow

TOTAL_STEPS = 30  # 40 windows / (batch 2 x accumulation 2) = 10 steps per epoch, 3 epochs

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from torch.utils.data import Dataset
    from scratchgpt.train.losses import Loss, lm_loss
    from scratchgpt.nn.model import GPTConfig, GPTModel
    from scratchgpt.train.callbacks import Callback
    from scratchgpt.train.trainer import Trainer
    from scratchgpt.train.config import TrainConfig
    from scratchgpt.train.state import save_weights, seed_everything

    out, log_path, kill_in_save_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Windows(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            start = torch.randint(0, 61, (n, 1), generator=g)
            self.seq = (start + torch.arange(13)) % 61
        def __len__(self):
            return len(self.seq)
        def __getitem__(self, i):
            return self.seq[i, :-1], self.seq[i, 1:], i

    seen = []
    def mean(model, batch):
        x, y, idx = batch
        if model.training:
            seen.extend(idx.tolist())
        return lm_loss(model, (x, y))
    loss_fn = Loss(mean, lm_loss.units)

    class Log(Callback):
        def on_step(self, trainer, loss):
            with open(log_path, "a") as f:
                f.write(json.dumps([trainer.step, seen]) + "\\n")
            seen.clear()
            time.sleep(0.03)  # leaves the test time to kill us between checkpoints
        def on_checkpoint(self, trainer, directory):
            print("CKPT", trainer.step, flush=True)

    def save(model, directory, extra):
        save_weights(model, directory, extra)
        if extra["checkpoint"]["step"] == kill_in_save_at:
            os.kill(os.getpid(), signal.SIGKILL)  # weights written, trainer state not yet

    seed_everything(5)
    model = GPTModel(GPTConfig(vocab_size=61, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1))
    cfg = TrainConfig(epochs=3, batch_size=2, grad_accum_steps=2, lr=3e-3, lr_schedule="cosine", warmup_steps=3,
                      eval_freq=4, eval_iter=2, checkpoint_every=4, seed=11, device="cpu", resume="auto")
    trainer = Trainer(model, loss_fn, Windows(40, 0), Windows(6, 1), cfg, out, callbacks=[Log()], save_fn=save,
                      collate_fn=None)
    result = trainer.fit()
    print("DONE", json.dumps({"final": result.final, "resumed_from": result.resumed_from_step,
                              "history": result.history}), flush=True)
    """
)


def child_cmd(tmp: Path, out: Path, log: Path, kill_in_save_at: int = -1) -> list[str]:
    script = tmp / "train_child.py"
    if not script.exists():
        script.write_text(CHILD)
    return [sys.executable, str(script), str(out), str(log), str(kill_in_save_at)]


def run_to_end(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("DONE ")]
    assert done, proc.stdout
    return json.loads(done[0][5:])


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def steps_logged(log: Path) -> list[tuple[int, list[int]]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_safetensors(a / WEIGHTS_FILE), read_safetensors(b / WEIGHTS_FILE)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list, dict]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out, log = tmp / "ckpt", tmp / "steps.jsonl"
    result = run_to_end(child_cmd(tmp, out, log))
    assert result["resumed_from"] is None
    logged = steps_logged(log)
    assert [s for s, _ in logged] == list(range(1, TOTAL_STEPS + 1))
    return out, logged, result


def test_sigkill_mid_training_then_resume_gives_identical_weights_and_batches(tmp_path, uninterrupted):
    ref_out, ref_steps, ref_result = uninterrupted
    out, log = tmp_path / "ckpt", tmp_path / "steps.jsonl"

    proc = subprocess.Popen(
        child_cmd(tmp_path, out, log), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env()
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("CKPT 8"):  # mid-epoch: step 8 of 10 in the first epoch
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, lines
    assert not any(line.startswith("DONE") for line in lines)

    state = read_trainer_state(out)
    killed_at = state["step"]
    assert 8 <= killed_at < TOTAL_STEPS and not state["finished"]
    before_kill = [s for s in steps_logged(log) if s[0] <= killed_at]

    log.rename(tmp_path / "steps_before_kill.jsonl")
    resumed = run_to_end(child_cmd(tmp_path, out, log))
    assert resumed["resumed_from"] == killed_at

    assert_same_weights(ref_out, out)
    # no repeated or skipped batches: the killed run up to its checkpoint + the resumed run
    assert before_kill + steps_logged(log) == ref_steps
    assert resumed["final"] == ref_result["final"]
    assert resumed["history"] == [
        {**r, "tokens_per_s": h["tokens_per_s"]} for r, h in zip(ref_result["history"], resumed["history"], strict=True)
    ]
    ref_state = torch.load(ref_out / STATE_FILE, weights_only=True)
    new_state = torch.load(out / STATE_FILE, weights_only=True)
    for i, per_param in ref_state["optimizer"]["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, new_state["optimizer"]["state"][i][name]), (i, name)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    ref_out, ref_steps, _ = uninterrupted
    out, log = tmp_path / "ckpt", tmp_path / "steps.jsonl"

    proc = subprocess.run(child_cmd(tmp_path, out, log, kill_in_save_at=8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "CKPT 4" in proc.stdout and "CKPT 8" not in proc.stdout
    # the half-written set (weights + config, no trainer state) never replaced the good one
    assert find_checkpoint(out) == out
    state = read_trainer_state(out)
    assert state["step"] == 4
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.") and p.name.endswith(".tmp")]
    assert leftovers and all((p / WEIGHTS_FILE).exists() and not (p / STATE_FILE).exists() for p in leftovers)

    before_kill = [s for s in steps_logged(log) if s[0] <= 4]
    log.rename(tmp_path / "steps_before_kill.jsonl")
    resumed = run_to_end(child_cmd(tmp_path, out, log))
    assert resumed["resumed_from"] == 4
    assert_same_weights(ref_out, out)
    assert before_kill + steps_logged(log) == ref_steps
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]  # leftovers cleaned up
