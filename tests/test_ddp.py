"""Distributed data parallel: 2 CPU processes under torchrun (gloo) train like 1 process on the same
global batch — same losses, same weights — and only rank 0 writes the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from scratchgpt.nn.checkpoint import read_safetensors
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.losses import lm_loss
from scratchgpt.train.state import WEIGHTS_FILE, read_trainer_state, seed_everything
from scratchgpt.train.trainer import Trainer

pytestmark = pytest.mark.slow

MODEL = dict(vocab_size=61, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
TRAIN = dict(epochs=2, grad_accum_steps=2, lr=1e-2, warmup_steps=2, eval_freq=2, eval_iter=3, seed=3, device="cpu")

CHILD = textwrap.dedent(
    f"""
    import json, os, sys
    import torch
    from torch.utils.data import TensorDataset
    from scratchgpt.train.losses import lm_loss
    from scratchgpt.nn.model import GPTConfig, GPTModel
    from scratchgpt.train.callbacks import Callback
    from scratchgpt.train.config import TrainConfig
    from scratchgpt.train.trainer import Trainer
    from scratchgpt.train.state import seed_everything

    def windows(n, seed):
        g = torch.Generator().manual_seed(seed)
        seq = (torch.randint(0, 61, (n, 1), generator=g) + torch.arange(13)) % 61
        return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())

    class Who(Callback):
        def on_train_start(self, trainer):
            print("CALLBACKS ON RANK", trainer.dist.rank, flush=True)

    out, result_dir, batch_size = sys.argv[1].format(rank=os.environ["RANK"]), sys.argv[2], int(sys.argv[3])
    seed_everything(1)
    model = GPTModel(GPTConfig(**{MODEL!r}))
    trainer = Trainer(model, lm_loss, windows(48, 0), windows(10, 1),
                      TrainConfig(batch_size=batch_size, **{TRAIN!r}), out, callbacks=[Who()])
    result = trainer.fit()
    rank = trainer.dist.rank
    with open(os.path.join(result_dir, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"world_size": trainer.dist.world_size, "history": result.history, "final": result.final,
                   "tokens_seen": result.tokens_seen, "step": result.step}}, f)
    """
)


def windows(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    seq = (torch.randint(0, 61, (n, 1), generator=g) + torch.arange(13)) % 61
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path: Path):
    script = tmp_path / "ddp_child.py"
    script.write_text(CHILD)
    out, results = tmp_path / "ckpt", tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(out), str(results), "2"], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("CALLBACKS ON RANK") == 1 and "CALLBACKS ON RANK 0" in proc.stdout
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # every rank agrees on the all-reduced numbers (throughput is each rank's own clock)
    strip = [[{k: v for k, v in h.items() if k != "tokens_per_s"} for h in r["history"]] for r in ranks]
    assert strip[0] == strip[1]

    # one process, batch 4 = 2 ranks x batch 2: the same samples in every optimizer step
    torch.set_num_threads(1)
    try:
        seed_everything(1)
        single = Trainer(
            GPTModel(GPTConfig(**MODEL)),
            lm_loss,
            windows(48, 0),
            windows(10, 1),
            TrainConfig(batch_size=4, **TRAIN),
            None,
        )
        result = single.fit()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)

    ddp = ranks[0]
    assert ddp["step"] == result.step == 12 and ddp["tokens_seen"] == result.tokens_seen == 2 * 48 * 12
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in result.history]
    for key in ("train_loss", "val_loss"):
        got = [h[key] for h in ddp["history"]]
        want = [h[key] for h in result.history]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
        assert ddp["final"][key] == pytest.approx(result.final[key], rel=1e-5)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.3  # it trained

    # rank 0 wrote one consistent checkpoint; its weights are the single process's
    assert read_trainer_state(out)["world_size"] == 2
    saved = read_safetensors(out / WEIGHTS_FILE)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5)

    # as on two nodes without shared storage: rank 0 sees that checkpoint, rank 1 an empty directory
    shutil.copytree(out, tmp_path / "node0")
    proc = subprocess.run([*cmd, str(script), str(tmp_path / "node{rank}"), str(results), "2"], capture_output=True,
                          text=True, timeout=240, env=env)  # fmt: skip
    assert proc.returncode != 0
    assert "would start from different steps (by rank: [12, 0])" in proc.stderr, proc.stderr[-4000:]


LAUNCHED = textwrap.dedent(
    """
    import logging, os, sys
    from scratchgpt.train import distributed
    logging.basicConfig(level=logging.INFO)
    distributed.launch(int(sys.argv[1]))
    line = f"rank {os.environ.get('RANK', '-')} of {os.environ.get('WORLD_SIZE', '-')} {sys.argv[1:]}\\n"
    os.write(1, line.encode())  # one write: the two ranks' lines never interleave on the shared pipe
    """
)


def test_launch_reruns_the_script_under_torchrun_with_nproc_processes(tmp_path: Path, monkeypatch):
    """`train.nproc: N` (distributed.launch): a stage script started alone becomes N torchrun processes."""
    script = tmp_path / "stage.py"
    script.write_text(LAUNCHED)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(script), "2", "--params", "p.yaml"], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2 ['2', '--params', 'p.yaml']", "rank 1 of 2 ['2', '--params', 'p.yaml']"]
    assert "relaunching under torchrun" in proc.stderr

    one = subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True, timeout=60, env=env)
    assert one.stdout.strip() == "rank - of - ['1']"

    from scratchgpt.plumbing.params import ParamsError
    from scratchgpt.train.distributed import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    launch(1)  # a hand-started torchrun: nproc 1 takes what it gives
    launch(2)
    with pytest.raises(ParamsError, match="train.nproc is 3 but torchrun started 2 processes"):
        launch(3)
