"""The training loop, built once and shared by every training stage.

    trainer = Trainer(model, lm_loss, train_ds, val_ds, TrainConfig(...), "models/pretrain")
    result = trainer.fit()

A `Trainer` takes a model, a loss function `(model, batch) -> scalar`, torch Datasets and a validated
`TrainConfig`; it returns a `TrainResult` (history of evaluations, final metrics, throughput) and
leaves a resumable checkpoint in its output directory. It knows nothing about tokenizers, MLflow or
DVC: stages plug those in through `Callback`s and the `sampler` hook.

Data order. Each epoch's order is a permutation drawn from a generator seeded with (seed, epoch), so
it is a pure function of the epoch; the position within the epoch is the optimizer step. Resuming
therefore replays exactly the batches an uninterrupted run would see. Under DDP a "global
micro-batch" of `batch_size * world_size` consecutive indices of that permutation is split into
`world_size` contiguous shards, so N processes with batch size B see exactly what one process with
batch size N*B (or B with N accumulation steps) sees.

Checkpoints. `<out>/model.safetensors`, `<out>/config.json` and `<out>/trainer_state.pt` (optimizer,
step, epoch, position, tokens seen, history, every rank's RNG states, a fingerprint of the
configuration and data) are written together into a fresh directory that then replaces `<out>`
(`fileio.atomic_dir`), so a kill at any moment leaves either the old set or the new one. The state
holds only tensors and primitives and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from scratchgpt import checkpoint, distributed, fileio, optim
from scratchgpt.distributed import DistInfo
from scratchgpt.memory import glibc_mallopt, keep_freed_memory
from scratchgpt.model import GPTModel
from scratchgpt.params import check_bool, check_choice, check_int, check_number, check_ratio, is_number
from scratchgpt.progress import progress_bar

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FORMAT = 1

LossFn = Callable[[nn.Module, Any], Tensor]
"""`loss_fn(model, batch) -> scalar tensor`: the mean loss of a batch already on the device."""
MetricFn = Callable[[nn.Module, Any], Tensor]
"""`metric_fn(model, batch) -> scalar tensor`: a per-batch mean (e.g. accuracy), evaluated only."""
Sampler = Callable[[nn.Module, torch.device], str]
"""`sampler(model, device) -> text`: called at each epoch end on rank 0 (e.g. greedy text sample)."""

_PRECISIONS = ("fp32", "bf16-mixed")
_DEVICES = distributed.DEVICES
# Fields that change how a run is executed or saved, not what it computes: a checkpoint made with
# other values is still resumable.
_OPERATIONAL_FIELDS = ("resume", "num_workers", "checkpoint_every", "nproc")
@dataclass
class TrainConfig:
    """How to train. Each field is a `params.yaml` key (e.g. `pretrain.train.lr`)."""

    epochs: int = 1
    """Passes over the training set."""
    batch_size: int = 8
    """Samples per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; effective batch = batch_size * grad_accum_steps * processes."""
    lr: float = 4e-4
    """Peak learning rate (reached at the end of warm-up)."""
    lr_schedule: str = "cosine"
    """After warm-up: "cosine" decay from `lr` to `min_lr`, or "constant" (the book's chapter 5)."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up length in optimizer steps; 0 disables warm-up."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all optimizer steps (instead of `warmup_steps`); 0 = use warmup_steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to weight matrices only (see `scratchgpt.optim`)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW exponential decay rates of the first and second moments."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""
    eval_freq: int = 5
    """Evaluate after optimizer step 1 and every `eval_freq` steps after it (as the book does)."""
    eval_iter: int | None = 5
    """Batches of train and of val data per periodic evaluation; null = the whole sets."""
    final_eval_iter: int | None = None
    """Batches per set for the final evaluation (the reported metrics); null = the whole sets."""
    checkpoint_every: int = 0
    """Write a checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    seed: int = 123
    """Seeds torch/numpy/python RNGs at a fresh start (rank r uses seed + r) and the data order."""
    device: str = "auto"
    """auto | cpu | cuda | mps ("auto": CUDA, else MPS, else CPU)."""
    precision: str = "fp32"
    """fp32 | bf16-mixed (autocast to bfloat16; weights, gradients and optimizer state stay fp32)."""
    compile: bool = False
    """Run the model through `torch.compile`."""
    resume: str = "auto"
    """auto: continue from a compatible checkpoint in the output directory; never: start afresh."""
    num_workers: int = 0
    """DataLoader worker processes for the training set (0: load in the training process)."""
    nproc: int = 1
    """Data-parallel processes the stage runs as: N > 1 makes the stage script relaunch itself under
    `torchrun --standalone --nproc_per_node N` (`scratchgpt.distributed.launch`; batch_size is per process).
    1: one process, or as many as a hand-started `torchrun` gives it."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "grad_accum_steps", "eval_freq", "nproc"):
            check_int(self, name, 1)
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "seed"):
            check_int(self, name, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be < 2**32, got {self.seed}")
        for name in ("eval_iter", "final_eval_iter"):
            if getattr(self, name) is not None:
                check_int(self, name, 1)
        check_number(self, "lr", 0, exclusive=True)
        for name in ("min_lr", "weight_decay", "grad_clip", "eps"):
            check_number(self, name, 0)
        check_ratio(self, "warmup_ratio", zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if not isinstance(self.betas, tuple) or len(self.betas) != 2 or not all(
            is_number(b) and 0 <= b < 1 for b in self.betas
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_choice(self, "lr_schedule", ("constant", "cosine"))
        check_choice(self, "device", _DEVICES)
        check_choice(self, "precision", _PRECISIONS)
        check_choice(self, "resume", ("auto", "never"))
        check_bool(self, "compile")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped before applying the update."""


class CheckpointMismatchError(RuntimeError):
    """The files of a checkpoint directory do not belong together."""


class Callback:
    """Hooks the `Trainer` calls on rank 0 only. Override the ones you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after any resume)."""

    def on_step(self, trainer: Trainer, loss: float) -> None:
        """After each optimizer step; `trainer.step` is the number of steps done."""

    def on_eval(self, trainer: Trainer, record: dict[str, float]) -> None:
        """After each evaluation (periodic, and the final one if at a new step); `record` is the
        new `history` row."""

    def on_sample(self, trainer: Trainer, sample: dict[str, Any]) -> None:
        """After the epoch-end sample: `{"epoch": int, "step": int, "text": str}`."""

    def on_checkpoint(self, trainer: Trainer, directory: Path) -> None:
        """After a checkpoint has been written (and swapped in) at `directory`."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the final evaluation."""


@dataclass
class TrainResult:
    """What a training run produced (the checkpoint itself is on disk)."""

    history: list[dict[str, float]]
    """One row per evaluation: step, epoch (fractional), tokens_seen, examples_seen, lr, tokens_per_s,
    train_loss, val_loss and `train_<metric>`/`val_<metric>` for each metric function."""
    final: dict[str, float]
    """The final evaluation (`final_eval_iter` batches): train_loss, val_loss, train_/val_<metric>."""
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


# ---------------------------------------------------------------------------------------------
# Small pieces, public because stages and tests use them


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device's) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Global RNG states as tensors and primitives (loadable with `weights_only=True`)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    random.setstate(
        (state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"])
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training-set order of `epoch`: a permutation of range(n) determined by (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def rank_batches(order: Sequence[int], batch_size: int, info: DistInfo, n_micro: int) -> list[list[int]]:
    """This rank's `n_micro` micro-batches of `order` (each global micro-batch split across ranks)."""
    global_batch = batch_size * info.world_size
    return [
        list(order[k * global_batch + info.rank * batch_size : k * global_batch + (info.rank + 1) * batch_size])
        for k in range(n_micro)
    ]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple/list/dict batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def first_tensor(batch: Any) -> Tensor:
    """The batch's input tensor: the batch itself, its first element, or its first dict value."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return first_tensor(next(iter(batch.values())))
    if isinstance(batch, tuple | list) and batch:
        return first_tensor(batch[0])
    raise TypeError(f"cannot find an input tensor in a batch of type {type(batch).__name__}")


def fingerprint_of(obj: Any) -> str:
    """A short, stable hash of a JSON-able value (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16-mixed", a no-op for "fp32"."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn,
    metric_fns: Mapping[str, MetricFn] | None = None,
    *,
    batch_size: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    precision: str = "fp32",
    max_batches: int | None = None,
    dist: DistInfo | None = None,
    eval_model: nn.Module | None = None,
) -> dict[str, float]:
    """Mean loss (and metrics) of `model` over the first `max_batches` global batches of `dataset`.

    A global batch is `batch_size * world_size` samples (None: the whole set). The samples are shared
    out among ranks and the sums all-reduced, so every rank gets the same answer, equal to a single
    process's with batch size `batch_size * world_size`. Means are weighted by batch size. The
    model (`eval_model`, when `model` is a compiled wrapper of it) is in eval mode meanwhile.
    """
    dist = dist or DistInfo()
    collate_fn = collate_fn or default_collate
    metric_fns = dict(metric_fns or {})
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size * dist.world_size)
    mine = list(range(dist.rank, n, dist.world_size))
    names = ["loss", *metric_fns]
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(len(names) + 1, dtype=dtype, device=device)
    module = eval_model if eval_model is not None else model
    was_training = module.training
    module.eval()
    try:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            batch = to_device(collate_fn([dataset[j] for j in chunk]), device)
            with autocast(device, precision):
                values = [loss_fn(model, batch)] + [fn(model, batch) for fn in metric_fns.values()]
            for k, v in enumerate(values):
                sums[k] += v.detach().to(dtype) * len(chunk)
            sums[-1] += len(chunk)
    finally:
        module.train(was_training)
    distributed.all_reduce_sum(sums, dist)
    count = sums[-1].item()
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {name: sums[k].item() / count for k, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# Saving and loading weights: our GPTModel layout, or any module via safetensors' shared-aware API


def save_weights(model: nn.Module, directory: Path, extra: dict[str, Any]) -> None:
    """Write `model.safetensors` + `config.json` into `directory` (GPTModel: `checkpoint.save_model`)."""
    if isinstance(model, GPTModel):
        checkpoint.save_model(model, directory, extra=extra)
        return
    with fileio.atomic_path(directory / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_model(model, str(tmp))
    fileio.write_json(directory / CONFIG_FILE, extra)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load `directory/model.safetensors` into `model` in place (strict names and shapes)."""
    if isinstance(model, GPTModel):
        checkpoint.load_weights(model, checkpoint.read_safetensors(directory / WEIGHTS_FILE))
        return
    device = next(model.parameters()).device
    safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory holding the latest complete checkpoint for `out_dir`, or None.

    Normally `out_dir` itself. `fileio.atomic_dir` swaps a new checkpoint in by renaming the old
    directory to `.<name>.old` and then the new one into place; a kill between the two renames
    leaves only `.<name>.old`, which is still a complete (older) checkpoint.
    """
    out_dir = Path(out_dir)
    for cand in (out_dir, out_dir.with_name(f".{out_dir.name}.old")):
        if (cand / STATE_FILE).is_file():
            return cand
    return None


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """`trainer_state.pt` of a checkpoint directory, checked against its `config.json`."""
    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointMismatchError(f"{directory / STATE_FILE}: not a trainer state of format {STATE_FORMAT}")
    config_path = directory / CONFIG_FILE
    try:
        stamp = json.loads(config_path.read_text(encoding="utf-8")).get("checkpoint", {})
    except (OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{config_path}: unreadable ({exc})") from exc
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointMismatchError(f"{directory}: {STATE_FILE} present but {WEIGHTS_FILE} missing")
    for key in ("step", "fingerprint"):
        if stamp.get(key) != state.get(key):
            raise CheckpointMismatchError(
                f"{directory}: {CONFIG_FILE} says {key}={stamp.get(key)!r} but {STATE_FILE} says "
                f"{state.get(key)!r}; the files are not from the same checkpoint"
            )
    return state


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains `model` on `train_data`, evaluating on `val_data`; see the module docstring.

    `loss_fn(model, batch)` and every `metric_fns[name](model, batch)` receive the module to call
    (possibly wrapped by DDP or `torch.compile`) and a batch from `collate_fn` already on the device;
    they return a scalar mean over the batch. `tokens_fn(batch)` counts a batch's tokens (default:
    the input tensor's numel, as the book). `save_fn(model, dir, extra)` / `load_fn(model, dir)`
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
    ) -> None:
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
        """On a glibc CPU run, keep freed memory in the heap while training (see scratchgpt.memory)."""
        if self.device.type != "cpu" or glibc_mallopt() is None:
            return contextlib.nullcontext()
        return keep_freed_memory()

    def evaluate(self, dataset: Dataset, max_batches: int | None) -> dict[str, float]:
        """Mean loss and metrics over the first `max_batches` global batches of `dataset` (None: all);
        see `evaluate_dataset`."""
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
                torch.save(state, tmp / STATE_FILE)
            self._remove_stale_dirs()
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
                self._fingerprint_changes(state),
            )
            return False
        self.load_fn(self.model, found)
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

    def _fingerprint_changes(self, state: Mapping[str, Any]) -> str:
        """What differs between a checkpoint's fingerprint and this run's, as `key: old -> new` lines."""
        if "fingerprint_parts" not in state:
            return f"fingerprint {state['fingerprint']}, now {self.fingerprint}; the checkpoint records no details"
        old = _flatten(json.loads(state["fingerprint_parts"]))
        new = _flatten(self.fingerprint_parts)
        changed = [
            f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
        ]
        return "changed: " + "; ".join(changed[:10]) + (f"; and {len(changed) - 10} more" if len(changed) > 10 else "")

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
        """One optimizer step over `grad_accum_steps` micro-batches; returns the mean loss."""
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
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = examples = 0
        for micro in range(cfg.grad_accum_steps):
            batch = to_device(next(batch_iter), self.device)
            last = micro == cfg.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with autocast(self.device, cfg.precision):
                    loss = self.loss_fn(self.train_model, batch)
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach().float()
            tokens += self.tokens_fn(batch)
            examples += first_tensor(batch).shape[0]
        counts = torch.tensor([float(tokens), float(examples)], device=self.device)
        stats = torch.cat([(loss_sum / cfg.grad_accum_steps).reshape(1), counts])
        distributed.all_reduce_sum(stats, self.dist)
        mean_loss = stats[0].item() / self.dist.world_size
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            where = f" The last good checkpoint (step {self._last_saved_step}) in {self.out_dir} is intact."
            raise NonFiniteLossError(
                f"non-finite training loss {mean_loss} at step {self.step + 1} (epoch {self.epoch + 1}); "
                "stopped before applying the update."
                + (where if self._last_saved_step is not None and self.out_dir is not None else "")
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(stats[1].item())
        self.examples_seen += int(stats[2].item())
        self._train_time += time.perf_counter() - t0
        return mean_loss

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
            val = f", val loss {record['val_loss']:.3f}" if "val_loss" in record else ""
            log.info(
                "epoch %d (step %06d): train loss %.3f%s",
                self.epoch + 1 if self.step % self.steps_per_epoch else self.epoch,
                self.step,
                record["train_loss"],
                val,
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

    def _remove_stale_dirs(self) -> None:
        """Leftovers of a save killed half-way (`.<name>.*.tmp`, `.<name>.old`)."""
        assert self.out_dir is not None
        name = self.out_dir.name
        for stale in self.out_dir.parent.glob(f".{name}.*"):
            if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name == f".{name}.old"):
                shutil.rmtree(stale, ignore_errors=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = "(absent)" if value is None else str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


# ---------------------------------------------------------------------------------------------
# Ready-made hooks


def text_sampler(
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    start_context: str = "Every effort moves you",
    max_new_tokens: int = 50,
) -> Sampler:
    """A `sampler` that continues `start_context` greedily with `scratchgpt.generate.generate`."""
    from scratchgpt.generate import generate

    def sample(model: nn.Module, device: torch.device) -> str:
        idx = torch.tensor([encode(start_context)], dtype=torch.long, device=device)
        out = generate(model, idx, max_new_tokens, temperature=0.0)
        return decode(out[0].tolist())

    return sample


class TrackingCallback(Callback):
    """Send evaluations and samples to a tracking run (anything with `log_metrics` and `log_text`,
    e.g. `scratchgpt.tracking.StageRun`)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def on_train_start(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.run.log_params(
            {
                "runtime": {
                    "world_size": trainer.dist.world_size,
                    "effective_batch_size": cfg.batch_size * cfg.grad_accum_steps * trainer.dist.world_size,
                    "device": str(trainer.device),
                    "resumed_from_step": trainer.resumed_from_step,
                }
            }
        )
        # A resumed run's tracking run starts empty: give it the curve so far.
        for record in trainer.history:
            self.on_eval(trainer, record)

    def on_eval(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.run.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def on_sample(self, trainer: Trainer, sample: dict[str, Any]) -> None:
        self.run.log_text(sample["text"], f"samples/epoch_{sample['epoch']:03d}.txt")
