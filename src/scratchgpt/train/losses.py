"""Loss functions with the trainer's signature `(model, batch) -> scalar tensor`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LossFn = Callable[[nn.Module, Any], Tensor]
"""`loss_fn(model, batch) -> scalar tensor`: the mean loss of a batch already on the device."""
MetricFn = Callable[[nn.Module, Any], Tensor]
"""`metric_fn(model, batch) -> scalar tensor`: a per-batch mean (e.g. accuracy), evaluated only."""


def lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy of `model(inputs)` against `targets` for a batch `(inputs, targets)`.

    The mean runs over every target position except those set to -100 (padding in instruction
    data). Logits are upcast to float32 first, so the loss is computed in full precision under
    bf16 autocast.
    """
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


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


def classification_loss(pool: str, weight: Tensor | None = None) -> Callable[[nn.Module, Any], Tensor]:
    """Cross-entropy of the pooled class logits against the labels (float32, as `lm_loss`); `weight`: one
    per class (e.g. inverse class frequencies for imbalanced data), torch's weighted mean."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        logits = classification_logits(model, batch, pool).float()
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits, batch[2], weight=w)

    return loss


def classification_accuracy(pool: str) -> Callable[[nn.Module, Any], Tensor]:
    """Share of the batch whose arg-max class is the label."""

    def accuracy(model: nn.Module, batch: Any) -> Tensor:
        return (classification_logits(model, batch, pool).argmax(dim=-1) == batch[2]).float().mean()

    return accuracy
