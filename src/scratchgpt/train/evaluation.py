"""Mean loss and metrics of a model over a dataset, shared out among data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from scratchgpt.train import distributed
from scratchgpt.train.batch import autocast, to_device
from scratchgpt.train.distributed import DistInfo
from scratchgpt.train.losses import LossFn, MetricFn


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
    batch_mean: bool = False,
) -> dict[str, float]:
    """Mean loss (and metrics) of `model` over the first `max_batches` global batches of `dataset`.

    A global batch is `batch_size * world_size` samples (None: the whole set). The samples are shared
    out among ranks and the sums all-reduced, so every rank gets the same answer. `loss` is the mean
    over every unit of those samples (`loss_fn.units`: the target tokens that count, or the examples),
    so it does not depend on `batch_size` or the world size. A metric is a per-example mean of each
    batch, weighted by the batch's examples. With `batch_mean`, `loss_batch_mean` is the loss
    averaged the same way, each batch's mean weighted by its examples: the book's `calc_loss_loader`
    (for full batches), which depends on `batch_size` when batches hold different numbers of units
    (batches without any are left out of it). The model (`eval_model`, when `model` is a compiled
    wrapper of it) is in eval mode meanwhile.
    """
    dist = dist or DistInfo()
    collate_fn = collate_fn or default_collate
    metric_fns = dict(metric_fns or {})
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size * dist.world_size)
    mine = list(range(dist.rank, n, dist.world_size))
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    # loss x units, units, batch mean x examples, examples of batches with units, each metric x examples, examples
    sums = torch.zeros(len(metric_fns) + 5, dtype=dtype, device=device)
    module = eval_model if eval_model is not None else model
    was_training = module.training
    module.eval()
    try:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            batch = collate_fn([dataset[j] for j in chunk])
            units = loss_fn.units(batch)
            batch = to_device(batch, device)
            with autocast(device, precision):
                loss = loss_fn(model, batch).detach().to(dtype)
                metrics = [fn(model, batch).detach().to(dtype) for fn in metric_fns.values()]
            if units:  # a batch without units has a NaN mean and adds nothing
                sums[0] += loss * units
                sums[1] += units
                sums[2] += loss * len(chunk)
                sums[3] += len(chunk)
            for k, value in enumerate(metrics):
                sums[4 + k] += value * len(chunk)
            sums[-1] += len(chunk)
    finally:
        module.train(was_training)
    distributed.all_reduce_sum(sums, dist)
    if sums[-1].item() == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if sums[1].item() == 0:
        raise ValueError(f"cannot evaluate the loss: every target of the {int(sums[-1].item())} examples is ignored")
    out = {"loss": (sums[0] / sums[1]).item()}
    if batch_mean:
        out["loss_batch_mean"] = (sums[2] / sums[3]).item()
    return out | {name: (sums[4 + k] / sums[-1]).item() for k, name in enumerate(metric_fns)}
