"""How a training stage trains: `TrainConfig`, one validated `params.yaml` section (`<stage>.train`)."""

from __future__ import annotations

from dataclasses import dataclass

from scratchgpt.plumbing.params import check_bool, check_choice, check_int, check_number, check_ratio, is_number
from scratchgpt.train import distributed

PRECISIONS = ("fp32", "bf16-mixed")


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
    """AdamW decoupled weight decay, applied to weight matrices only (see `scratchgpt.train.optim`)."""
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
    `torchrun --standalone --nproc_per_node N` (`scratchgpt.train.distributed.launch`; batch_size is per process).
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
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_choice(self, "lr_schedule", ("constant", "cosine"))
        check_choice(self, "device", distributed.DEVICES)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "resume", ("auto", "never"))
        check_bool(self, "compile")
