"""Loss functions for the trainer: a batch's mean loss, and how many units that mean runs over.

A loss function is called as `loss_fn(model, batch) -> scalar tensor` (the mean over the batch's units)
and says what it averages over with `loss_fn.units(batch) -> float`: the target tokens that count for a
language model (those not set to -100), the examples for a classifier. The trainer weighs each
micro-batch's mean by its units over the whole optimizer step's (every micro-batch, every process),
so a step minimises one mean over every unit it saw, whatever the batch size, accumulation or world
size; evaluation reports the same unit-level mean. Wrap any other loss as `Loss(mean_fn, units_fn)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

IGNORE_INDEX = -100
"""A target with this value is not learned from (padding, masked prompts) and is not a unit."""


class LossFn(Protocol):
    """`loss_fn(model, batch) -> scalar tensor`: the mean loss of a batch already on the device, over
    `loss_fn.units(batch)` units (called on the batch as collated, before it moves to the device)."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor: ...

    def units(self, batch: Any) -> float: ...


MetricFn = Callable[[nn.Module, Any], Tensor]
"""`metric_fn(model, batch) -> scalar tensor`: a per-example mean (e.g. accuracy), evaluated only."""


@dataclass(frozen=True)
class Loss:
    """A `LossFn` made of `mean(model, batch)` and `units(batch)`, the number of units that mean runs over."""

    mean: Callable[[nn.Module, Any], Tensor]
    units: Callable[[Any], float]

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.mean(model, batch)


def target_tokens(batch: Any) -> int:
    """Targets of a batch `(inputs, targets, ...)` that count: those not set to -100."""
    return int((batch[1] != IGNORE_INDEX).sum())


def token_cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy of `model(inputs)` against `targets` for a batch `(inputs, targets)`.

    The mean runs over every target position except those set to -100 (padding in instruction
    data); with none left it is NaN. Logits are upcast to float32 first, so the loss is computed in
    full precision under bf16 autocast.
    """
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


lm_loss = Loss(token_cross_entropy, target_tokens)
"""The language-modelling loss: `token_cross_entropy`, averaged over `target_tokens`."""


# --- sequence classification (the book's chapter 6) ---------------------------------------------

POOLS = ("last-token", "last-position")
"""Which position's logits classify a padded sequence: its last real token (padding-independent,
since attention is causal), or the last position of the padded batch (the book's choice)."""


def classification_logits(model: nn.Module, batch: Any, pool: str) -> Tensor:
    """Class logits (B, C) of a batch `(inputs, lengths, labels)` from a model with a C-way head."""
    inputs, lengths, _ = batch
    if pool == "last-position":
        return model(inputs, last_only=True)[:, -1]
    if pool != "last-token":
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    logits = model(inputs)
    return logits[torch.arange(inputs.shape[0], device=inputs.device), lengths - 1]


def labelled_examples(batch: Any) -> int:
    """Examples of a batch `(inputs, lengths, labels)`: one label each."""
    return len(batch[2])


def classification_loss(pool: str, weight: Tensor | None = None) -> Loss:
    """Cross-entropy of the pooled class logits against the labels (float32, as `lm_loss`); `weight`: one
    per class (e.g. inverse class frequencies for imbalanced data), torch's weighted mean, whose units are
    the batch's label weights summed (so accumulation and evaluation weigh each example as torch does)."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        logits = classification_logits(model, batch, pool).float()
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits, batch[2], weight=w)

    if weight is None:
        return Loss(loss, labelled_examples)
    cpu_weight = weight.detach().double().cpu()

    def label_weights(batch: Any) -> float:
        return float(cpu_weight[torch.as_tensor(batch[2]).cpu()].sum())

    return Loss(loss, label_weights)


def classification_accuracy(pool: str) -> Callable[[nn.Module, Any], Tensor]:
    """Share of the batch whose arg-max class is the label."""

    def accuracy(model: nn.Module, batch: Any) -> Tensor:
        return (classification_logits(model, batch, pool).argmax(dim=-1) == batch[2]).float().mean()

    return accuracy
