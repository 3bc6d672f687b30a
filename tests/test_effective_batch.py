"""The effective batch is exact: one optimizer step over the same samples has the same gradient, and logs the
same loss, whether they come as one batch, as accumulated micro-batches or from several data-parallel
processes, even when the micro-batches hold very different numbers of target tokens (masked instruction
data). Evaluation losses do not depend on the evaluation batch size either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from scratchgpt.apps.classify import attach_head, pad_collate, real_tokens
from scratchgpt.apps.instruct import instruction_collate
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.train.callbacks import Callback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.distributed import DistInfo
from scratchgpt.train.evaluation import evaluate_dataset
from scratchgpt.train.losses import Loss, classification_loss, lm_loss
from scratchgpt.train.state import epoch_order, rank_batches, seed_everything
from scratchgpt.train.trainer import Trainer

TINY = GPTConfig(vocab_size=61, context_length=48, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
PAD = 60  # the tiny vocabulary's end-of-text
LENGTHS = [6, 40, 9, 33, 12, 27, 7, 38]  # eight examples of very different lengths
SEED = 5  # its first epoch's order puts the four longest examples first
UNITS_LONG, UNITS_SHORT = 97, 27  # response targets (and end-of-text) of the four longest and the four shortest


@dataclass
class Setup:
    """One training stage's kind of data: the model, loss, samples and collate the stage would use."""

    model: Callable[[], nn.Module]
    loss: Loss
    data: Any
    collate: Callable[[list[Any]], Any]
    tokens_fn: Callable[[Any], int] | None = None


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def instruction_examples() -> list[tuple[Tensor, int]]:
    """`(ids, prompt length)` items, as `InstructionDataset` gives: the first third of each is its prompt."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, PAD, (n,), generator=g), max(2, n // 3)) for n in LENGTHS]


def all_prompt_when_short() -> list[tuple[Tensor, int]]:
    """`instruction_examples`, but the four short ones are all prompt (as a prompt cut to the context): they have
    no target, and they make up whole micro-batches (and one process's batch) of the step."""
    return [(ids, len(ids) + 1 if len(ids) < 20 else n_prompt) for ids, n_prompt in instruction_examples()]


def spam_texts() -> list[tuple[Tensor, int]]:
    """`(ids, label)` items, as `SpamDataset` gives."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, PAD, (n,), generator=g), i % 2) for i, n in enumerate(LENGTHS)]


def windows() -> TensorDataset:
    """Pretraining windows: every target counts, all the same length."""
    g = torch.Generator().manual_seed(2)
    seq = (torch.randint(0, PAD, (len(LENGTHS), 1), generator=g) + torch.arange(13)) % PAD
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def classifier() -> nn.Module:
    return attach_head(GPTModel(TINY), 2)


SETUPS = {
    "instruct": Setup(
        lambda: GPTModel(TINY),
        lm_loss,
        instruction_examples(),
        instruction_collate(pad_id=PAD, mask_prompt=True, allowed_max_length=TINY.context_length),
    ),
    "instruct-empty-micro-batches": Setup(
        lambda: GPTModel(TINY),
        lm_loss,
        all_prompt_when_short(),
        instruction_collate(pad_id=PAD, mask_prompt=True, allowed_max_length=TINY.context_length),
    ),
    "cls": Setup(classifier, classification_loss("last-token"), spam_texts(), pad_collate(pad_id=PAD), real_tokens),
    # class weights (cls.class_weights: balanced): torch's weighted mean runs over the labels' weights
    "cls-weighted": Setup(classifier, classification_loss("last-token", torch.tensor([0.6, 2.5])), spam_texts(),
                          pad_collate(pad_id=PAD), real_tokens),
    "pretrain": Setup(lambda: GPTModel(TINY), lm_loss, windows(), default_collate),
}
# (batch size per process, accumulation steps) of one optimizer step over the eight samples, one process
SPLITS = [(8, 1), (4, 2), (2, 4)]


def first_step(kind: str, batch_size: int, accum: int) -> dict[str, Any]:
    """Train `kind` for its one optimizer step over the eight samples; its gradient (flat, as the optimizer
    saw it) and the loss the trainer logged for it."""
    setup = SETUPS[kind]
    seed_everything(1)
    model = setup.model()
    cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-3, warmup_steps=0,
                      grad_clip=0.0, eval_iter=1, final_eval_iter=1, seed=SEED, device="cpu")  # fmt: skip
    steps: list[float] = []

    class StepLoss(Callback):
        def on_step(self, trainer: Trainer, loss: float) -> None:
            steps.append(loss)

    trainer = Trainer(model, setup.loss, setup.data, None, cfg, None, collate_fn=setup.collate,
                      tokens_fn=setup.tokens_fn, callbacks=[StepLoss()])  # fmt: skip
    grads: list[Tensor] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.append(flat_grad(model)))
    trainer.fit()
    assert trainer.step == 1 and len(grads) == 1
    return {"grad": grads[0], "loss": steps[0] if steps else None, "rank": trainer.dist.rank}  # rank 0 logs


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def one_batch(kind: str) -> dict[str, Any]:
    """The reference, without the trainer: the loss of the eight samples as one batch and its gradient."""
    setup = SETUPS[kind]
    seed_everything(1)
    model = setup.model()
    loss = setup.loss(model, setup.collate([setup.data[i] for i in range(len(LENGTHS))]))
    loss.backward()
    return {"grad": flat_grad(model), "loss": loss.item()}


def relative_difference(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_instruction_micro_batches_hold_very_different_numbers_of_targets():
    """What makes the other tests fail when micro-batch means are averaged: the step's micro-batches (or the
    processes' batches) of 4 hold the long examples and the short ones, with about 4 times the targets."""
    setup = SETUPS["instruct"]
    order = epoch_order(len(LENGTHS), SEED, 0)
    micro = rank_batches(order, 4, DistInfo(), 2)
    assert [[LENGTHS[i] for i in batch] for batch in micro] == [[40, 38, 33, 27], [7, 6, 12, 9]]
    units = [lm_loss.units(setup.collate([setup.data[i] for i in batch])) for batch in micro]
    assert units == [UNITS_LONG, UNITS_SHORT] and UNITS_LONG > 3 * UNITS_SHORT
    assert lm_loss.units(setup.collate(setup.data)) == sum(units)  # prompt targets and padding are masked
    empty = SETUPS["instruct-empty-micro-batches"]
    assert [lm_loss.units(empty.collate([empty.data[i] for i in batch])) for batch in micro] == [UNITS_LONG, 0]


@pytest.mark.parametrize("kind", list(SETUPS))
def test_accumulated_micro_batches_give_the_one_batch_gradient_and_loss(kind: str):
    want = one_batch(kind)
    for batch_size, accum in SPLITS:
        got = first_step(kind, batch_size, accum)
        assert relative_difference(got["grad"], want["grad"]) <= 1e-5, (kind, batch_size, accum)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (kind, batch_size, accum)


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_effective_batch import SETUPS, first_step

    out = sys.argv[2]
    torch.set_num_threads(1)
    for kind in SETUPS:
        for batch_size, accum in ((4, 1), (2, 2)):  # x 2 processes: eight samples per optimizer step
            got = first_step(kind, batch_size, accum)
            if got["rank"] == 0:
                torch.save(got, f"{out}/{kind}-{batch_size}x{accum}.pt")
    """
)


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_batch_gradient_and_loss(tmp_path: Path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(Path(__file__).parent), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for kind in SETUPS:
        want = one_batch(kind)
        for split in ("4x1", "2x2"):
            got = torch.load(tmp_path / f"{kind}-{split}.pt")
            assert relative_difference(got["grad"], want["grad"]) <= 1e-5, json.dumps([kind, split])
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (kind, split)


def test_a_step_without_any_target_stops_with_a_clear_error():
    from scratchgpt.train.trainer import NonFiniteLossError

    prompts_only = [(ids, len(ids) + 1) for ids, _ in instruction_examples()]  # every target is prompt
    setup = SETUPS["instruct"]
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum_steps=2, warmup_steps=0, device="cpu")
    trainer = Trainer(GPTModel(TINY), lm_loss, prompts_only, None, cfg, None, collate_fn=setup.collate)
    with pytest.raises(NonFiniteLossError, match=r"step's 8 examples is ignored \(-100\) at step 1 "):
        trainer.fit()


def test_a_loss_that_does_not_say_what_it_averages_is_refused():
    with pytest.raises(TypeError, match=r"loss_fn must say how many units its mean runs over"):
        Trainer(GPTModel(TINY), lambda model, batch: lm_loss(model, batch), windows(), None,
                TrainConfig(epochs=1, batch_size=4, device="cpu"), None)  # fmt: skip


def test_evaluation_losses_do_not_depend_on_the_batch_size():
    setup = SETUPS["instruct"]
    seed_everything(1)
    model = setup.model()
    want = one_batch("instruct")["loss"]

    def evaluate(batch_size: int) -> dict[str, float]:
        return evaluate_dataset(model, setup.data, lm_loss, batch_size=batch_size, device=torch.device("cpu"),
                                collate_fn=setup.collate, batch_mean=True)  # fmt: skip

    for batch_size in (1, 2, 3, 8):
        assert evaluate(batch_size)["loss"] == pytest.approx(want, rel=1e-6), batch_size
        without_targets = evaluate_dataset(model, all_prompt_when_short(), lm_loss, batch_size=batch_size,
                                           device=torch.device("cpu"), collate_fn=setup.collate)  # fmt: skip
        assert without_targets["loss"] == pytest.approx(one_batch("instruct-empty-micro-batches")["loss"], rel=1e-6)
        cfg = TrainConfig(epochs=1, batch_size=batch_size, device="cpu")
        trainer = Trainer(model, lm_loss, setup.data, None, cfg, None, collate_fn=setup.collate)
        assert trainer.evaluate(setup.data, None)["loss"] == pytest.approx(want, rel=1e-6), batch_size
    # the book's mean over batches of per-batch means is not the token mean: it moves with the batch size
    book = {batch_size: evaluate(batch_size)["loss_batch_mean"] for batch_size in (1, 2, 8)}
    assert book[8] == pytest.approx(want, rel=1e-6)
    assert abs(book[1] - want) > 1e-3 and abs(book[2] - want) > 1e-3 and abs(book[1] - book[2]) > 1e-3
