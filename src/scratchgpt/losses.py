"""Loss functions with the trainer's signature `(model, batch) -> scalar tensor`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F


def lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy of `model(inputs)` against `targets` for a batch `(inputs, targets)`.

    The mean runs over every target position except those set to -100 (padding in instruction
    data). Logits are upcast to float32 first, so the loss is computed in full precision under
    bf16 autocast.
    """
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
