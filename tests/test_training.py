"""The Trainer, its config, the optimizer groups and the learning-rate schedule (tiny models, CPU)."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from scratchgpt.nn.checkpoint import load_model
from scratchgpt.nn.generate import text_sampler
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.plumbing.params import ParamsError, from_dict, parse_yaml
from scratchgpt.train.callbacks import Callback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.distributed import DistInfo
from scratchgpt.train.losses import Loss, lm_loss
from scratchgpt.train.optim import lr_at, param_groups
from scratchgpt.train.state import (
    STATE_FILE,
    CheckpointMismatchError,
    epoch_order,
    find_checkpoint,
    rank_batches,
    read_trainer_state,
    seed_everything,
)
from scratchgpt.train.trainer import NonFiniteLossError, Trainer

TINY = GPTConfig(vocab_size=61, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1)


def windows(n: int, seed: int = 0, length: int = 12) -> TensorDataset:
    """`n` token windows where the next token is mostly predictable (so a model can learn)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, TINY.vocab_size, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % TINY.vocab_size
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def tiny_model(seed: int = 1, **overrides) -> GPTModel:
    seed_everything(seed)
    return GPTModel(GPTConfig(**{**TINY.__dict__, **overrides}))


def config(**overrides) -> TrainConfig:
    base = dict(
        epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, eval_freq=3, eval_iter=2, device="cpu", seed=7
    )
    return TrainConfig(**{**base, **overrides})


def fit(out: Path | None, cfg: TrainConfig, model: nn.Module | None = None, **kwargs):
    model = model or tiny_model()
    trainer = Trainer(model, kwargs.pop("loss_fn", lm_loss), windows(32), windows(8, seed=1), cfg, out, **kwargs)
    return trainer, trainer.fit()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 1.5),
        ("grad_accum_steps", 0),
        ("lr", 0),
        ("lr", float("nan")),
        ("min_lr", 1.0),  # above lr
        ("lr_schedule", "linear"),
        ("warmup_ratio", 1.0),
        ("betas", [0.9]),
        ("betas", [0.9, 1.0]),
        ("grad_clip", -1.0),
        ("eval_iter", 0),
        ("device", "tpu"),
        ("precision", "fp16"),
        ("resume", "always"),
        ("compile", "yes"),
        ("seed", -1),
        ("eval_freq", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ParamsError, match=field):
        from_dict(TrainConfig, {field: value}, "pretrain.train")


def test_config_rejects_unknown_keys_and_both_warmups():
    with pytest.raises(ParamsError, match="unknown key"):
        from_dict(TrainConfig, {"learning_rate": 1e-3}, "pretrain.train")
    with pytest.raises(ParamsError, match="warmup_steps or warmup_ratio"):
        from_dict(TrainConfig, {"warmup_steps": 2, "warmup_ratio": 0.1}, "pretrain.train")


def test_config_from_yaml_lists():
    cfg = from_dict(TrainConfig, {"betas": [0.9, 0.95], "eval_iter": None}, "t")
    assert cfg.betas == (0.9, 0.95) and cfg.eval_iter is None


def test_config_reads_floats_as_dvc_writes_them():
    """`dvc exp run -S pretrain.train.eps=1e-7` leaves `eps: 1e-07` in params.yaml: a string to PyYAML."""
    text = "eps: 1e-07\nlr: 5e-05\nbetas: [0.9, 1e-01]\n"
    assert yaml.safe_load(text)["eps"] == "1e-07"  # PyYAML alone reads a string
    cfg = from_dict(TrainConfig, parse_yaml(text), "t")
    assert (cfg.eps, cfg.lr, cfg.betas) == (1e-7, 5e-5, (0.9, 0.1))
    with pytest.raises(ParamsError, match="lr must be a finite number"):
        from_dict(TrainConfig, {"lr": "fast"}, "t")


# --- optimizer groups and schedule ----------------------------------------------------------------


def test_weight_decay_only_on_linear_weight_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "out_head.weight" in decayed and "trf_blocks.0.att.W_query.weight" in decayed
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift"} <= kept
    assert "trf_blocks.0.ff.layers.0.bias" in kept
    assert all(p.dim() >= 2 for p in decay["params"])
    assert decayed | kept == set(names.values())


def test_tied_head_is_an_embedding_and_counted_once():
    model = tiny_model(tie_weights=True)
    groups = param_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert not any(p is model.tok_emb.weight for p in groups[0]["params"])


def test_frozen_parameters_are_not_optimized_or_changed(tmp_path):
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("trf_blocks.1.", "final_norm."))
    before = weights(model)
    trainer, _ = fit(None, config(epochs=1), model)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in optimized) == p.requires_grad
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_lr_schedule_warmup_cosine_and_constant():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    lrs = [lr_at(s, schedule="cosine", **kw) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # monotone decay
    assert lrs[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] > 0.1 and lr_at(14, schedule="cosine", **kw) == pytest.approx(0.1)
    assert [lr_at(s, schedule="constant", **kw) for s in (0, 3, 4, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_at(0, lr=4e-4, min_lr=0, warmup_steps=0, total_steps=5, schedule="constant") == 4e-4


# --- data order ---------------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))
    assert epoch_order(50, 3, 0) != epoch_order(50, 3, 1) != epoch_order(50, 4, 1)


def test_rank_shards_of_a_global_batch_equal_the_single_process_batch():
    order = epoch_order(20, 0, 0)
    single = rank_batches(order, 4, DistInfo(), 5)
    r0 = rank_batches(order, 2, DistInfo(rank=0, world_size=2), 5)
    r1 = rank_batches(order, 2, DistInfo(rank=1, world_size=2), 5)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == single


# --- training -----------------------------------------------------------------------------------


def test_training_learns_and_reports_history(tmp_path):
    trainer, result = fit(tmp_path / "ckpt", config(epochs=3, lr=3e-2, lr_schedule="cosine", min_lr=1e-4))
    first, last = result.history[0], result.history[-1]
    # as the book: after step 1, then every eval_freq (3) steps; plus the final evaluation
    assert [r["step"] for r in result.history] == [1, 4, 7, 10, 13, 16, 19, 22, 24]
    assert result.step == 3 * 8 == trainer.total_steps
    assert result.tokens_seen == 3 * 32 * 12 == last["tokens_seen"]
    assert result.examples_seen == 96
    assert last["epoch"] == 3.0 and first["epoch"] == pytest.approx(1 / 8)
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert result.final["val_loss"] < result.history[0]["val_loss"]
    assert result.tokens_per_s > 0 and result.train_time_s > 0 and result.wall_time_s >= result.train_time_s
    assert first["lr"] == pytest.approx(3e-2 / 2)  # warm-up step 1 of 2


def test_seeded_cpu_runs_are_bit_identical_and_the_seed_matters():
    runs = []
    for seed in (7, 7, 8):
        t = Trainer(tiny_model(), lm_loss, windows(32), windows(8, 1), config(epochs=1, seed=seed), None)
        t.fit()
        runs.append((weights(t.model), t.history))
    (w1, h1), (w2, h2), (w3, _) = runs
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_dataloader_workers_do_not_change_the_run():
    """Workers only load batches: same order, same dropout stream, bit-identical weights."""
    runs = []
    for workers in (0, 2):
        t = Trainer(tiny_model(), lm_loss, windows(32), None, config(epochs=2, num_workers=workers), None)
        t.fit()
        runs.append(weights(t.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_gradient_accumulation_matches_a_bigger_batch():
    big = Trainer(tiny_model(drop_rate=0.0), lm_loss, windows(32), None, config(epochs=1, batch_size=8), None)
    big.fit()
    acc = Trainer(
        tiny_model(drop_rate=0.0),
        lm_loss,
        windows(32),
        None,
        config(epochs=1, batch_size=4, grad_accum_steps=2),
        None,
    )
    acc.fit()
    assert big.step == acc.step == 4
    wb, wa = weights(big.model), weights(acc.model)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def grad_norms_at_update(grad_clip: float) -> list[float]:
    """Global gradient norms as the optimizer sees them (spying on torch's AdamW.step)."""
    t = Trainer(tiny_model(drop_rate=0.0), lm_loss, windows(32), None, config(epochs=1, grad_clip=grad_clip), None)
    seen, step = [], t.optimizer.step

    def spying_step(*args, **kwargs):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.params])).item())
        return step(*args, **kwargs)

    t.optimizer.step = spying_step
    t.fit()
    return seen


def test_gradient_clipping_bounds_the_global_norm():
    raw = grad_norms_at_update(0.0)  # 0 disables clipping
    assert max(raw) > 0.5
    clipped = grad_norms_at_update(0.5)
    assert len(clipped) == 8 and max(clipped) <= 0.5 + 1e-5


def test_metric_functions_and_eval_weighting():
    def correct_first_token(model, batch):
        x, y = batch
        return (model(x)[:, 0].argmax(-1) == y[:, 0]).float().mean()

    model = tiny_model()
    t = Trainer(
        model,
        lm_loss,
        windows(10),
        windows(7, 1),
        config(epochs=1, batch_size=4),
        None,
        metric_fns={"acc": correct_first_token},
    )
    # 7 samples in batches of 4 + 3: the mean is over samples, not batches.
    got = t.evaluate(t.val_data, None)
    model.eval()
    with torch.no_grad():
        x, y = t.val_data.tensors
        logits = model(x)
        want_loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        want_acc = (logits[:, 0].argmax(-1) == y[:, 0]).float().mean().item()
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["acc"] == pytest.approx(want_acc)
    result = t.fit()
    assert {"train_acc", "val_acc", "train_loss", "val_loss"} <= set(result.history[0])


def test_text_sampler_and_callbacks_run_on_epoch_end(tmp_path):
    events = []

    class Recorder(Callback):
        def on_train_start(self, trainer):
            events.append(("start", trainer.step))

        def on_eval(self, trainer, record):
            events.append(("eval", record["step"]))

        def on_sample(self, trainer, sample):
            events.append(("sample", sample["epoch"], sample["text"]))

        def on_checkpoint(self, trainer, directory):
            events.append(("ckpt", trainer.step, directory))

        def on_train_end(self, trainer, result):
            events.append(("end", result.step))

    sampler = text_sampler(lambda s: [1, 2, 3], lambda ids: ",".join(map(str, ids)), "ignored", 4)
    fit(tmp_path / "ckpt", config(epochs=2, checkpoint_every=5), sampler=sampler, callbacks=[Recorder()])
    samples = [e for e in events if e[0] == "sample"]
    assert [s[1] for s in samples] == [1, 2]
    assert all(s[2].startswith("1,2,3,") and len(s[2].split(",")) == 7 for s in samples)
    assert [e[1] for e in events if e[0] == "ckpt"] == [5, 10, 15, 16]
    assert events[0] == ("start", 0) and events[-1] == ("end", 16)


def test_bf16_mixed_precision_trains_on_cpu():
    t = Trainer(tiny_model(), lm_loss, windows(16), windows(4, 1), config(epochs=1, precision="bf16-mixed"), None)
    result = t.fit()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert math.isfinite(result.final["train_loss"]) and math.isfinite(result.final["val_loss"])


def test_too_little_data_for_one_step_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Trainer(tiny_model(), lm_loss, windows(3), None, config(batch_size=4), None)


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_is_a_consistent_loadable_set(tmp_path):
    out = tmp_path / "ckpt"
    trainer, result = fit(out, config(epochs=2, checkpoint_every=5))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", STATE_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    state = read_trainer_state(out)  # weights_only=True inside
    assert state["step"] == 16 and state["finished"] and state["epoch"] == 2 and state["position"] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["checkpoint"]["step"] == 16 and cfg["train"]["lr"] == 3e-3 and cfg["model"]["emb_dim"] == 16
    loaded = load_model(out)
    for k, v in weights(trainer.model).items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert state["history"] == result.history[: len(state["history"])]


def test_resume_auto_continues_and_never_restarts(tmp_path):
    out = tmp_path / "ckpt"
    fit(out, config(epochs=1))
    t, r = fit(out, config(epochs=1))
    assert r.resumed_from_step == 8 and t.step == 8  # finished: nothing left to do
    t, r = fit(out, config(epochs=1, resume="never"))
    assert r.resumed_from_step is None


def test_checkpoint_from_other_params_is_not_resumed(tmp_path, caplog):
    out = tmp_path / "ckpt"
    fit(out, config(epochs=1))
    _, r = fit(out, config(epochs=1, lr=1e-3))
    assert r.resumed_from_step is None
    assert "made with other params, data or code" in caplog.text
    # checkpoint_every is operational: changing it keeps the checkpoint resumable
    _, r = fit(out, config(epochs=1, lr=1e-3, checkpoint_every=3))
    assert r.resumed_from_step == 8


def test_mismatched_files_are_refused(tmp_path):
    out = tmp_path / "ckpt"
    fit(out, config(epochs=1))
    cfg = json.loads((out / "config.json").read_text())
    cfg["checkpoint"]["step"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="step"):
        fit(out, config(epochs=1))


def test_a_kill_between_the_swap_renames_leaves_the_old_checkpoint_usable(tmp_path):
    """`atomic_dir` renames the old checkpoint to `.<name>.old` before moving the new one in."""
    out = tmp_path / "ckpt"
    fit(out, config(epochs=1))
    os.replace(out, tmp_path / ".ckpt.old")
    assert find_checkpoint(out) == tmp_path / ".ckpt.old"
    _, r = fit(out, config(epochs=1))
    assert r.resumed_from_step == 8
    fit(out, config(epochs=1, checkpoint_every=3, resume="never"))
    assert find_checkpoint(out) == out and not (tmp_path / ".ckpt.old").exists()


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    calls = {"n": 0}

    def nan_at_step_7(model, batch):
        loss = lm_loss(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 7:
                return loss * float("nan")
        return loss

    model = tiny_model()
    with pytest.raises(NonFiniteLossError, match=r"nan at step 7 .*checkpoint \(step 6\)"):
        fit(out, config(epochs=2, checkpoint_every=3), model, loss_fn=Loss(nan_at_step_7, lm_loss.units))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the update was not applied
    state = read_trainer_state(out)
    assert state["step"] == 6 and not state["finished"]
    assert all(torch.isfinite(v).all() for v in load_model(out).state_dict().values())
    # and training resumes from it
    _, r = fit(out, config(epochs=2, checkpoint_every=3))
    assert r.resumed_from_step == 6 and r.step == 16


def test_state_loads_with_weights_only(tmp_path):
    out = tmp_path / "ckpt"
    fit(out, config(epochs=1, checkpoint_every=3))
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert set(state["rng"][0]) >= {"torch", "numpy_keys", "python_state"}
    shutil.rmtree(out)


FAULTS_SCRIPT = """
import json, resource, torch
from scratchgpt.train.memory import keep_freed_memory

def faults_for_big_allocations():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 1024 * 1024)  # 64 MiB, freed at once: glibc maps and unmaps it by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.ones(16 * 1024 * 1024)
default = faults_for_big_allocations()
with keep_freed_memory():
    faults_for_big_allocations()  # the heap grows to fit, then stays
    faults_for_big_allocations()
    kept = faults_for_big_allocations()
print(json.dumps({"default": default, "kept": kept}))
"""


def test_keep_freed_memory_stops_glibc_from_unmapping_big_buffers():
    """Page faults of five 64 MiB tensors, in a fresh process: glibc's heap state is process-wide, and what
    earlier tests allocated and freed (and their mallopt calls) would change the default's count."""
    from scratchgpt.train.memory import glibc_mallopt

    if glibc_mallopt() is None:
        pytest.skip("glibc only")
    proc = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = json.loads(proc.stdout)
    assert faults["default"] > 5 * 16_000 and faults["kept"] < faults["default"] / 10, faults
