"""The training loop, built once and shared by every training stage.

    trainer = Trainer(model, lm_loss, train_ds, val_ds, TrainConfig(...), "models/pretrain")
    result = trainer.fit()

A `Trainer` takes a model, a loss function (`train.losses`: a batch's mean loss and how many units
it averages over), torch Datasets and a validated
`TrainConfig` (`train.config`); it returns a `TrainResult` (history of evaluations, final metrics,
throughput) and leaves a resumable checkpoint in its output directory (`train.state` says what it
holds and how the data order makes a resume exact). It knows nothing about tokenizers, MLflow or
DVC: stages plug those in through `Callback`s (`train.callbacks`) and the `sampler` hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from scratchgpt.plumbing import fileio
from scratchgpt.plumbing.progress import progress_bar
from scratchgpt.train import distributed, optim
from scratchgpt.train.batch import autocast, first_tensor, to_device
from scratchgpt.train.callbacks import Callback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.evaluation import evaluate_dataset
from scratchgpt.train.losses import LossFn, MetricFn
from scratchgpt.train.memory import glibc_mallopt, keep_freed_memory
from scratchgpt.train.state import (
    STATE_FILE,
    STATE_FORMAT,
    WEIGHTS_FILE,
    CorruptCheckpointError,
    capture_rng,
    epoch_order,
    find_checkpoint,
    fingerprint_changes,
    fingerprint_of,
    load_weights,
    rank_batches,
    read_trainer_state,
    remove_stale_dirs,
    restore_rng,
    save_weights,
    seed_everything,
    write_trainer_state,
)

log = logging.getLogger(__name__)

Sampler = Callable[[nn.Module, torch.device], str]
"""`sampler(model, device) -> text`: called at each epoch end on rank 0 (e.g. `generate.text_sampler`)."""

# Fields that change how a run is executed or saved, not what it computes: a checkpoint made with
# other values is still resumable.
_OPERATIONAL_FIELDS = ("resume", "num_workers", "checkpoint_every", "nproc")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (or had no target to average over); training stopped
    before applying the update."""


@dataclass
class TrainResult:
    """What a training run produced (the checkpoint itself is on disk)."""

    history: list[dict[str, float]]
    """One row per evaluation: step, epoch (fractional), tokens_seen, examples_seen, lr, tokens_per_s,
    train_loss, val_loss (each the mean over every loss unit evaluated), `train_<metric>`/`val_<metric>`
    for each metric function, and train_/val_loss_batch_mean with `batch_mean_loss`."""
    final: dict[str, float]
    """The final evaluation (`final_eval_iter` batches), with the same keys as a history row's losses and metrics."""
    step: int
    """Optimizer steps done in total (including those before a resume)."""
    epochs: int
    tokens_seen: int
    examples_seen: int
    train_time_s: float
    """Time spent in training steps (data loading, forward, backward, update), summed over the
    sessions of a resumed run; evaluation, sampling and checkpointing are not included."""
    wall_time_s: float
    """Time `fit` took in this process, evaluation and checkpointing included."""
    tokens_per_s: float
    """tokens_seen / train_time_s (all ranks together)."""
    resumed_from_step: int | None
    """Step of the checkpoint this run continued from; None for a fresh start."""
    samples: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains `model` on `train_data`, evaluating on `val_data`; see the module docstring.

    `loss_fn(model, batch)` and every `metric_fns[name](model, batch)` receive the module to call
    (possibly wrapped by DDP or `torch.compile`) and a batch from `collate_fn` already on the device;
    they return a scalar mean over the batch. `loss_fn.units(batch)` says how many units (target
    tokens, examples) the loss averages over (`train.losses.LossFn`): each optimizer step, and each
    evaluation, is one mean over all of them, whatever the batching. `batch_mean_loss` also reports
    `<split>_loss_batch_mean` in evaluations: the mean over batches of each batch's mean loss, the book's
    `calc_loss_loader`, which depends on `batch_size`. `tokens_fn(batch)` counts a batch's tokens
    (default: the input tensor's numel, as the book); it and `loss_fn.units` see the batch before it
    moves to the device. `save_fn(model, dir, extra)` / `load_fn(model, dir)`
    write and read the weights and `config.json` (default: `save_weights` / `load_weights`; a LoRA
    stage might save adapters only). `fingerprint` (any JSON-able value: model config, data
    hashes, ...) is combined with the training config; a checkpoint with a different fingerprint is
    not resumed from. `checkpoint_extra` goes into `config.json` next to the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_data: Dataset,
        val_data: Dataset | None,
        cfg: TrainConfig,
        out_dir: str | Path | None,
        *,
        metric_fns: Mapping[str, MetricFn] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        callbacks: Iterable[Callback] = (),
        sampler: Sampler | None = None,
        fingerprint: Any = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
        tokens_fn: Callable[[Any], int] | None = None,
        save_fn: Callable[[nn.Module, Path, dict[str, Any]], None] | None = None,
        load_fn: Callable[[nn.Module, Path], None] | None = None,
        desc: str = "train",
        batch_mean_loss: bool = False,
    ) -> None:
        if not callable(getattr(loss_fn, "units", None)):
            raise TypeError(
                "loss_fn must say how many units its mean runs over (loss_fn.units(batch)), so that accumulation "
                "and data parallelism weigh every unit alike: use scratchgpt.train.losses.lm_loss, "
                "classification_loss(pool), or wrap yours as Loss(mean_fn, units_fn)"
            )
        self.cfg = cfg
        self.dist, self.device = distributed.setup(cfg.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.metric_fns = dict(metric_fns or {})
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.collate_fn = collate_fn or default_collate
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.sampler = sampler
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.tokens_fn = tokens_fn or (lambda batch: first_tensor(batch).numel())
        self.save_fn = save_fn or save_weights
        self.load_fn = load_fn or load_weights
        self.desc = desc
        self.batch_mean_loss = batch_mean_loss

        micro_per_epoch = len(train_data) // (cfg.batch_size * self.dist.world_size)
        self.steps_per_epoch = micro_per_epoch // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(train_data)} samples, fewer than one optimizer step needs "
                f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x "
                f"{self.dist.world_size} process(es))"
            )
        if val_data is not None and len(val_data) == 0:
            raise ValueError("the validation set is empty")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = optim.warmup_steps_for(self.total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        self.fingerprint_parts = json.loads(
            json.dumps(
                {
                    "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OPERATIONAL_FIELDS},
                    "world_size": self.dist.world_size,
                    "user": fingerprint,
                },
                sort_keys=True,
                default=str,
            )
        )
        self.fingerprint = fingerprint_of(self.fingerprint_parts)

        self.optimizer = optim.build_adamw(
            self.model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            eps=cfg.eps,
            device=self.device,
        )
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.fwd_model: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.train_model: nn.Module = self.fwd_model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.fwd_model, device_ids=device_ids)

        self.step = 0
        self.tokens_seen = 0
        self.examples_seen = 0
        self.history: list[dict[str, float]] = []
        self.samples: list[dict[str, Any]] = []
        self.resumed_from_step: int | None = None
        self._last_saved_step: int | None = None
        self._train_time = 0.0  # seconds in training steps, over all sessions of this run

    # -- properties --------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """0-based epoch of the next optimizer step."""
        return self.step // self.steps_per_epoch

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def tokens_per_s(self) -> float:
        """Training throughput so far (all ranks, all sessions of this run; evaluation excluded)."""
        return self.tokens_seen / self._train_time if self._train_time > 0 else 0.0

    # -- public API --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to `cfg.epochs` (resuming if allowed), write the final checkpoint, evaluate."""
        start = time.perf_counter()
        if not self._maybe_resume():
            seed_everything(self.cfg.seed + self.dist.rank)
        self._check_same_start()
        self.model.train()
        for cb in self.callbacks:
            cb.on_train_start(self)
        pbar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc=self.desc,
            unit="step",
            show=self.dist.is_main,
            dynamic_ncols=True,
        )
        try:
            with self._cpu_heap():
                while self.step < self.total_steps:
                    self._run_epoch(pbar)
        finally:
            pbar.close()
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        final = self._evaluate_both(self.cfg.final_eval_iter)
        if not self.history or self.history[-1]["step"] != self.step:
            self.history.append(self._record(final))
            for cb in self.callbacks:
                cb.on_eval(self, self.history[-1])
        result = TrainResult(
            history=list(self.history),
            final=final,
            step=self.step,
            epochs=self.cfg.epochs,
            tokens_seen=self.tokens_seen,
            examples_seen=self.examples_seen,
            train_time_s=self._train_time,
            wall_time_s=time.perf_counter() - start,
            tokens_per_s=self.tokens_per_s,
            resumed_from_step=self.resumed_from_step,
            samples=list(self.samples),
        )
        log.log(
            logging.INFO if self.dist.is_main else logging.DEBUG,
            "done: %d steps, %d tokens, final train loss %.3f, val loss %s, %.0f tokens/s",
            result.step,
            result.tokens_seen,
            final["train_loss"],
            f"{final['val_loss']:.3f}" if "val_loss" in final else "n/a",
            result.tokens_per_s,
        )
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _cpu_heap(self) -> contextlib.AbstractContextManager[None]:
        """On a glibc CPU run, keep freed memory in the heap while training (see scratchgpt.train.memory)."""
        if self.device.type != "cpu" or glibc_mallopt() is None:
            return contextlib.nullcontext()
        return keep_freed_memory()

    def evaluate(self, dataset: Dataset, max_batches: int | None) -> dict[str, float]:
        """Mean loss (over every unit) and metrics over the first `max_batches` global batches of `dataset`
        (None: all), and `loss_batch_mean` with `batch_mean_loss`; see `evaluate_dataset`."""
        return evaluate_dataset(
            self.fwd_model,
            dataset,
            self.loss_fn,
            self.metric_fns,
            batch_size=self.cfg.batch_size,
            device=self.device,
            collate_fn=self.collate_fn,
            precision=self.cfg.precision,
            max_batches=max_batches,
            dist=self.dist,
            eval_model=self.model,
            batch_mean=self.batch_mean_loss,
        )

    def save_checkpoint(self) -> None:
        """Write weights + config + trainer state as one atomic set (rank 0; all ranks must call)."""
        rng = distributed.all_gather_objects(capture_rng(), self.dist)
        if self.dist.is_main and self.out_dir is not None:
            finished = self.step >= self.total_steps
            stamp = {
                "step": self.step,
                "epoch": self.epoch,
                "tokens_seen": self.tokens_seen,
                "fingerprint": self.fingerprint,
                "finished": finished,
            }
            state = {
                "format": STATE_FORMAT,
                "step": self.step,
                "epoch": self.epoch,
                "position": self.step - self.epoch * self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "tokens_seen": self.tokens_seen,
                "examples_seen": self.examples_seen,
                "finished": finished,
                "fingerprint": self.fingerprint,
                "fingerprint_parts": json.dumps(self.fingerprint_parts, sort_keys=True),
                "world_size": self.dist.world_size,
                "data_seed": self.cfg.seed,
                "optimizer": self.optimizer.state_dict(),
                "rng": rng,
                "history": self.history,
                "samples": self.samples,
                "train_time_s": self._train_time,
            }
            extra = {**self.checkpoint_extra, "train": dataclasses.asdict(self.cfg), "checkpoint": stamp}
            with fileio.atomic_dir(self.out_dir) as tmp:
                self.save_fn(self.model, tmp, extra)
                write_trainer_state(tmp / STATE_FILE, state)
            remove_stale_dirs(self.out_dir)
            log.info("checkpoint: step %d written to %s", self.step, self.out_dir)
            for cb in self.callbacks:
                cb.on_checkpoint(self, self.out_dir)
        self._last_saved_step = self.step
        distributed.barrier(self.dist)

    # -- internals ---------------------------------------------------------------------------

    def _maybe_resume(self) -> bool:
        """Load the latest compatible checkpoint if `resume: auto`; True if training continues from it."""
        if self.cfg.resume != "auto" or self.out_dir is None:
            return False
        found = find_checkpoint(self.out_dir)
        if found is None:
            return False
        state = read_trainer_state(found)
        if state["fingerprint"] != self.fingerprint:
            log.warning(
                "not reusing the checkpoint in %s: it was made with other params, data or code (%s); "
                "training from scratch, the checkpoint will be overwritten",
                found,
                fingerprint_changes(state, self.fingerprint_parts),
            )
            return False
        try:
            self.load_fn(self.model, found)
        except Exception as exc:  # the state and config matched: the weights file itself is bad
            raise CorruptCheckpointError(found / WEIGHTS_FILE, exc) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.examples_seen = state["examples_seen"]
        self.history = list(state["history"])
        self.samples = list(state["samples"])
        self._train_time = float(state["train_time_s"])
        restore_rng(state["rng"][self.dist.rank])
        self.resumed_from_step = self.step
        self._last_saved_step = self.step
        log.log(
            logging.INFO if self.dist.is_main else logging.DEBUG,
            "resuming from %s: step %d of %d (epoch %d, %d tokens seen)",
            found,
            self.step,
            self.total_steps,
            min(self.epoch + 1, self.cfg.epochs),
            self.tokens_seen,
        )
        if self.step >= self.total_steps and self.dist.is_main:
            log.warning(
                "%s holds a finished run with the same params, data and code: reusing it, nothing to train "
                "(its weights are what training would produce again). To retrain from scratch anyway, set "
                "`resume: never` in the stage's train params (e.g. `dvc exp run -S <stage>.train.resume=never`) "
                "or delete the directory",
                found,
            )
        return True

    def _check_same_start(self) -> None:
        """Fail unless every process starts from the same step. Each reads the checkpoint from its own node's
        disk: a node that cannot see it would train from scratch beside the others, and the job would hang."""
        steps = distributed.all_gather_objects(self.step, self.dist)
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"the processes would start from different steps (by rank: {steps}): some see a checkpoint in "
                f"{self.out_dir} that others do not. Under multi-node torchrun, put the stage's output directory on "
                "storage every node shares, or train from scratch with `resume: never`"
            )

    def _run_epoch(self, pbar: tqdm) -> None:
        cfg = self.cfg
        epoch = self.epoch
        position = self.step - epoch * self.steps_per_epoch
        n_micro = self.steps_per_epoch * cfg.grad_accum_steps
        batches = rank_batches(epoch_order(len(self.train_data), cfg.seed, epoch), cfg.batch_size, self.dist, n_micro)
        loader = DataLoader(
            self.train_data,
            batch_sampler=batches[position * cfg.grad_accum_steps :],
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating the iterator must not draw from the global RNG (dropout).
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )
        batch_iter = iter(loader)
        for _ in range(position, self.steps_per_epoch):
            loss = self._train_step(batch_iter)
            pbar.update(1)
            pbar.set_postfix(
                epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_s:.0f}"
            )
            for cb in self.callbacks:
                cb.on_step(self, loss)
            if (self.step - 1) % cfg.eval_freq == 0:
                self._periodic_eval()
            if self.step % self.steps_per_epoch == 0:
                self._epoch_end(epoch)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()

    def _train_step(self, batch_iter: Any) -> float:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its loss, the mean over every
        unit (target token, example) of every micro-batch on every process.

        The units are counted first, all micro-batches of all processes together; each micro-batch's mean
        is then weighed by its share of them, so the gradient is that of one mean over the whole step: the
        same as one batch of `batch_size * grad_accum_steps * world_size` samples, however many targets
        each micro-batch masks. DDP averages the processes' gradients, hence the world size in the weight.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        optim.set_lr(
            self.optimizer,
            optim.lr_at(
                self.step,
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
                schedule=cfg.lr_schedule,
            ),
        )
        batches = [next(batch_iter) for _ in range(cfg.grad_accum_steps)]
        units = [self.loss_fn.units(batch) for batch in batches]  # on the host: no device sync
        total_units, tokens, examples = self._step_counts(batches, units)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro, (batch, n) in enumerate(zip(batches, units, strict=True)):
            last = micro == cfg.grad_accum_steps - 1
            if n == 0 and not (last and self.dist.enabled):
                continue  # nothing to learn from (its mean is NaN); under DDP the last backward must run: it syncs
            batch = to_device(batch, self.device)
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with autocast(self.device, cfg.precision):
                    loss = self.loss_fn(self.train_model, batch)
                (loss * (n * self.dist.world_size / total_units)).backward()
            if n:
                loss_sum += loss.detach().float() * (n / total_units)
        distributed.all_reduce_sum(loss_sum, self.dist)
        mean_loss = loss_sum.item()
        if not math.isfinite(mean_loss):
            self._stop(f"non-finite training loss {mean_loss}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        self.examples_seen += examples
        self._train_time += time.perf_counter() - t0
        return mean_loss

    def _step_counts(self, batches: list[Any], units: list[float]) -> tuple[float, int, int]:
        """Loss units, tokens and examples of one optimizer step's micro-batches, summed over the processes."""
        tokens = sum(self.tokens_fn(batch) for batch in batches)
        examples = sum(first_tensor(batch).shape[0] for batch in batches)
        where = self.device if self.dist.enabled else torch.device("cpu")  # NCCL reduces device tensors
        counts = torch.tensor([sum(units), tokens, examples], dtype=torch.float64, device=where)
        total_units, tokens, examples = distributed.all_reduce_sum(counts, self.dist).tolist()
        tokens, examples = round(tokens), round(examples)
        if total_units == 0:
            self._stop(f"nothing to learn: every target of the step's {examples} examples is ignored (-100)")
        return total_units, tokens, examples

    def _stop(self, what: str) -> None:
        """Raise NonFiniteLossError for the step about to be taken, before any update is applied."""
        self.optimizer.zero_grad(set_to_none=True)
        where = f" The last good checkpoint (step {self._last_saved_step}) in {self.out_dir} is intact."
        raise NonFiniteLossError(
            f"{what} at step {self.step + 1} (epoch {self.epoch + 1}); stopped before applying the update."
            + (where if self._last_saved_step is not None and self.out_dir is not None else "")
        )

    def _evaluate_both(self, max_batches: int | None) -> dict[str, float]:
        out = {f"train_{k}": v for k, v in self.evaluate(self.train_data, max_batches).items()}
        if self.val_data is not None:
            out |= {f"val_{k}": v for k, v in self.evaluate(self.val_data, max_batches).items()}
        return out

    def _record(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "tokens_seen": self.tokens_seen,
            "examples_seen": self.examples_seen,
            "lr": self.lr,
            "tokens_per_s": self.tokens_per_s,
            **metrics,
        }

    def _periodic_eval(self) -> None:
        record = self._record(self._evaluate_both(self.cfg.eval_iter))
        self.history.append(record)
        if self.dist.is_main:
            log.info(
                "epoch %d (step %06d): %s",
                self.epoch + 1 if self.step % self.steps_per_epoch else self.epoch,
                self.step,
                _loss_line(record),
            )
        for cb in self.callbacks:
            cb.on_eval(self, record)

    def _epoch_end(self, epoch: int) -> None:
        if self.sampler is None or not self.dist.is_main:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.cfg.precision):
                text = self.sampler(self.model, self.device)
        finally:
            self.model.train(was_training)
        sample = {"epoch": epoch + 1, "step": self.step, "text": text}
        self.samples.append(sample)
        log.info("sample after epoch %d: %r", epoch + 1, text)
        for cb in self.callbacks:
            cb.on_sample(self, sample)


def _loss_line(record: Mapping[str, float]) -> str:
    """`train loss 2.612, val loss 2.604`, then the book's per-batch means when they were computed."""
    line = f"train loss {record['train_loss']:.3f}"
    line += f", val loss {record['val_loss']:.3f}" if "val_loss" in record else ""
    if "train_loss_batch_mean" in record:
        line += f" (per-batch means, as the book: train {record['train_loss_batch_mean']:.3f}"
        line += f", val {record['val_loss_batch_mean']:.3f})" if "val_loss_batch_mean" in record else ")"
    return line
