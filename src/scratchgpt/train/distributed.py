"""Distributed data parallel plumbing: one process per device, launched by `torchrun`.

The same script runs alone or under `torchrun --nproc_per_node N`: `setup()` reads the launcher's
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) and joins the process group (NCCL on CUDA, gloo on
CPU); without it, it is a no-op and every helper here degrades to the single-process case.
`launch(nproc)` lets a stage start itself that way (`train.nproc` in params.yaml), so `dvc repro` runs it
data parallel without a hand-typed `torchrun`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scratchgpt.plumbing.params import ParamsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank, 0..world_size-1
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node: picks the GPU

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, tracks and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto|cpu|cuda|mps` -> a concrete device (CUDA picks this process's GPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but torch.backends.mps.is_available() is False")
    if name not in ("cpu", "mps"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or mps")
    return torch.device(name)


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Resolve `device` for this process and, if launched by torchrun (WORLD_SIZE > 1), join the group.

    Idempotent: a second call returns the same answer without re-initializing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(), dev
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank), dev


def launch(nproc: int) -> None:
    """Make the running stage script `nproc` data-parallel processes (its `train.nproc` param).

    Outside `torchrun`, with `nproc` > 1, this process is replaced (`os.execv`: same PID, so DVC and
    signals still reach it) by `python -m torch.distributed.run --standalone --nproc_per_node nproc
    <this script> <its arguments>`, which runs the script `nproc` times; nothing before this call
    should have side effects. With `nproc` 1 it returns at once (one process, or what a hand-started
    `torchrun` gave). Under `torchrun` with `nproc` > 1, the world size must equal `nproc`.
    """
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is not None:
        if nproc > 1 and int(world_size) != nproc:
            raise ParamsError(f"train.nproc is {nproc} but torchrun started {world_size} processes; "
                              "set train.nproc to 1 to use what torchrun gives, or let the stage launch itself")
        return
    if nproc <= 1:
        return
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            sys.argv[0], *sys.argv[1:]]  # fmt: skip
    log.info("train.nproc = %d: relaunching under torchrun: %s", nproc, " ".join(argv[1:]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, argv)


def teardown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over all ranks in place (no-op for one process); returns `t`."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
