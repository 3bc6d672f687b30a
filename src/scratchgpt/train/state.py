"""What a checkpoint holds besides the weights, and how it is read back.

Data order. Each epoch's order is a permutation drawn from a generator seeded with (seed, epoch), so
it is a pure function of the epoch; the position within the epoch is the optimizer step. Resuming
therefore replays exactly the batches an uninterrupted run would see. Under DDP a "global
micro-batch" of `batch_size * world_size` consecutive indices of that permutation is split into
`world_size` contiguous shards, so N processes with batch size B see exactly what one process with
batch size N*B (or B with N accumulation steps) sees.

Files. `<out>/model.safetensors`, `<out>/config.json` and `<out>/trainer_state.pt` (optimizer,
step, epoch, position, tokens seen, history, every rank's RNG states, a fingerprint of the
configuration and data) are written together into a fresh directory that then replaces `<out>`
(`fileio.atomic_dir`), so a kill at any moment leaves either the old set or the new one. The state
holds only tensors and primitives and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from scratchgpt.nn import checkpoint
from scratchgpt.nn.model import GPTModel
from scratchgpt.plumbing import fileio
from scratchgpt.train.distributed import DistInfo

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FORMAT = 1


class CheckpointMismatchError(RuntimeError):
    """The files of a checkpoint directory do not belong together."""


class CorruptCheckpointError(CheckpointMismatchError):
    """A file of a checkpoint directory is truncated or corrupt: the checkpoint cannot be resumed or reused.

    Training does not silently start afresh over it (it may hold hours of training): the message names
    the file and the ways on.
    """

    def __init__(self, path: Path, reason: object) -> None:
        if isinstance(reason, BaseException):  # the reader's own words: the innermost cause's first sentence
            while reason.__cause__ is not None:
                reason = reason.__cause__
            reason = _first_sentence(reason)
        directory = path.parent
        super().__init__(
            f"{path} is truncated or corrupt ({reason}), so the checkpoint in {directory} can be neither resumed "
            f"nor reused. Restore it (`dvc checkout --force {directory}` brings back the one DVC last recorded), "
            f"or train from scratch: delete {directory}, or set `resume: never` in the stage's train params "
            "(e.g. `dvc exp run -S pretrain.train.resume=never`)"
        )


# Seeding, RNG states and the data order


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


def fingerprint_of(obj: Any) -> str:
    """A short, stable hash of a JSON-able value (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# Weights: our GPTModel layout, or any module via safetensors' shared-aware API


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


def write_trainer_state(path: Path, state: Mapping[str, Any]) -> None:
    """`torch.save` the state through a Python file: a full disk then surfaces as its OSError (ENOSPC,
    EFBIG) inside torch's error, where a path would give only an errno-less "file write failed"."""
    with open(path, "wb") as f:
        torch.save(dict(state), f)


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """`trainer_state.pt` of a checkpoint directory, checked against its `config.json`.

    A truncated or corrupt file raises CorruptCheckpointError naming it.
    """
    directory = Path(directory)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # torch's zip reader: RuntimeError
        raise CorruptCheckpointError(directory / STATE_FILE, exc) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointMismatchError(f"{directory / STATE_FILE}: not a trainer state of format {STATE_FORMAT}")
    config_path = directory / CONFIG_FILE
    try:
        stamp = json.loads(config_path.read_text(encoding="utf-8")).get("checkpoint", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(config_path, f"unreadable: {exc}") from exc
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointMismatchError(f"{directory}: {STATE_FILE} present but {WEIGHTS_FILE} missing")
    for key in ("step", "fingerprint"):
        if stamp.get(key) != state.get(key):
            raise CheckpointMismatchError(
                f"{directory}: {CONFIG_FILE} says {key}={stamp.get(key)!r} but {STATE_FILE} says "
                f"{state.get(key)!r}; the files are not from the same checkpoint"
            )
    return state


def fingerprint_changes(state: Mapping[str, Any], parts: Mapping[str, Any]) -> str:
    """What differs between a checkpoint's fingerprint (its `state`) and this run's `parts`, as `key: old -> new`."""
    if "fingerprint_parts" not in state:
        now = fingerprint_of(parts)
        return f"fingerprint {state['fingerprint']}, now {now}; the checkpoint records no details"
    old = _flatten(json.loads(state["fingerprint_parts"]))
    new = _flatten(parts)
    changed = [
        f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return "changed: " + "; ".join(changed[:10]) + (f"; and {len(changed) - 10} more" if len(changed) > 10 else "")


def remove_stale_dirs(out_dir: Path) -> None:
    """Leftovers of a save killed half-way beside `out_dir` (`.<name>.*.tmp`, `.<name>.old`)."""
    name = out_dir.name
    for stale in out_dir.parent.glob(f".{name}.*"):
        if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name == f".{name}.old"):
            shutil.rmtree(stale, ignore_errors=True)


def _first_sentence(exc: BaseException) -> str:
    """What failed, without torch's paragraph of advice ("... This is an internal miniz error. If you ...")."""
    text = str(exc).strip() or type(exc).__name__
    return text.split(". ")[0].rstrip(".")


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
