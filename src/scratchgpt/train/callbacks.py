"""Hooks into the `Trainer`: the `Callback` base and the tracking callback that sends a run to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scratchgpt.train.trainer import Trainer, TrainResult


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


class TrackingCallback(Callback):
    """Send evaluations and samples to a tracking run (anything with `log_params`, `log_metrics` and `log_text`
    taking `synchronous=`, e.g. `scratchgpt.plumbing.tracking.StageRun`).

    Every call is `synchronous=False`: the run logs in the background, so a tracking store that is slow or
    gone never stops or slows the training loop (the stage's final, synchronous logging reports it).
    """

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
            },
            synchronous=False,
        )
        # A resumed run's tracking run starts empty: give it the curve so far.
        for record in trainer.history:
            self.on_eval(trainer, record)

    def on_eval(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.run.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]),
                             synchronous=False)  # fmt: skip

    def on_sample(self, trainer: Trainer, sample: dict[str, Any]) -> None:
        self.run.log_text(sample["text"], f"samples/epoch_{sample['epoch']:03d}.txt", synchronous=False)
