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
