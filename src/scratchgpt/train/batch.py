"""A batch on its way into the model: onto the device, its input tensor, the precision it runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16-mixed", a no-op for "fp32"."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
