"""What the pipeline's stages share: their code dependencies, input checks and the training-stage tail.

The code a stage runs is listed once, as the stage's `.py` deps in `dvc.yaml`. DVC reruns the stage
when one of them changes, and `code_digest(stage)` hashes exactly those files for the checkpoint
fingerprint of a training stage, so that rerun can never resume (or reuse) a checkpoint the old code
made. `tests/test_project.py` checks that every stage's `.py` deps are exactly the project modules
its script imports, directly or through each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from scratchgpt.data.datasets import DatasetError
from scratchgpt.nn import checkpoint
from scratchgpt.plumbing import fileio, plots
from scratchgpt.plumbing.params import flatten, parse_yaml
from scratchgpt.train.state import CONFIG_FILE
from scratchgpt.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

DVC_FILE = "dvc.yaml"
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")


class StageError(RuntimeError):
    """dvc.yaml does not describe the stage as the code expects."""


def dvc_root() -> Path:
    """The directory holding `dvc.yaml`: the cwd (DVC runs stages there), else the project root."""
    if Path(DVC_FILE).is_file():
        return Path.cwd()
    from scratchgpt.plumbing.tracking import project_root

    return project_root()


def stage_deps(stage: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """The `deps` of `stage` in `<root>/dvc.yaml`, as written there (paths relative to root)."""
    path = Path(root or dvc_root()) / DVC_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the stage from the project root")
    stages = (parse_yaml(path.read_text(encoding="utf-8")) or {}).get("stages", {})
    if stage not in stages:
        raise StageError(f"{path} has no stage {stage!r} (stages: {sorted(stages)})")
    return [str(dep) for dep in stages[stage].get("deps", [])]


def code_deps(stage: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """The Python files among `stage`'s deps in dvc.yaml: the code DVC watches for it."""
    return [dep for dep in stage_deps(stage, root) if dep.endswith(".py")]


def code_digest(stage: str, root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """sha256 of every code file `stage` depends on (per dvc.yaml), keyed by its path."""
    base = Path(root or dvc_root())
    deps = code_deps(stage, base)
    if not deps:
        raise StageError(f"stage {stage!r} lists no .py deps in {base / DVC_FILE}")
    missing = [dep for dep in deps if not (base / dep).is_file()]
    if missing:
        raise StageError(f"stage {stage!r}: code deps {missing} listed in {DVC_FILE} do not exist")
    return {dep: fileio.sha256_file(base / dep) for dep in deps}


def data_digest(files: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
    """sha256 of each named input file (for the checkpoint fingerprint and config.json)."""
    return {name: fileio.sha256_file(path) for name, path in files.items()}


def check_tracking() -> None:
    """Before any work: a tracking store that cannot be reached fails the stage at once, in one line naming it
    and the ways out (`tracking.check_store`; only in the process that tracks, rank 0 under torchrun)."""
    from scratchgpt.plumbing import tracking

    tracking.check_store(enabled=int(os.environ.get("RANK", "0")) == 0)


def require_files(paths: Iterable[str | os.PathLike[str]], producer: str) -> None:
    """FileNotFoundError naming the first missing input and the stage that makes it."""
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run the {producer} stage first")


@contextlib.contextmanager
def made_by(producer: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """An unreadable input (a truncated or corrupt model or Parquet split: CheckpointError, DatasetError) read
    in the block is reported with the two ways to a good copy of `path`, an output of stage `producer`."""
    try:
        yield
    except (checkpoint.CheckpointError, DatasetError) as exc:
        raise type(exc)(
            f"{exc}. {path} is an output of the {producer} stage: restore it (`dvc checkout --force {path}`) or "
            f"make it again (`dvc repro {producer}`)"
        ) from exc


SPLITS = ("train", "val", "test")


def load_splits(data_dir: Path, open_split: Callable[[Path], Any]) -> dict[str, Any]:
    """train/val/test opened from `data_dir/<split>.parquet` (written by sample-to-parquet) with
    `open_split`; a missing file or an empty split is refused before any training."""
    files = {split: data_dir / f"{split}.parquet" for split in SPLITS}
    require_files(files.values(), "sample-to-parquet")
    with made_by("sample-to-parquet", data_dir):
        splits = {split: open_split(path) for split, path in files.items()}
    for split, ds in splits.items():
        if len(ds) == 0:
            raise DatasetError(f"{files[split]}: the {split} split is empty")
    return splits


def finetune_fingerprint(stage: str, section: str, params: Any, base_dir: Path, data: Mapping[str, Path]) -> dict:
    """What a fine-tuning checkpoint must have been made from to be resumed or reused: the stage's
    params (not how it trains: `train` and `preset`), the base's weights, the data files and the code."""
    hyper = {k: v for k, v in dataclasses.asdict(params).items() if k not in ("train", "preset")}
    return {
        section: hyper,
        "base": data_digest({"weights": base_dir / checkpoint.WEIGHTS_FILE}),
        "data": data_digest(data),
        "code": code_digest(stage),
    }


def method_label(method: str, lora_rank: int) -> str:
    """What a fine-tuning trains, for a run's name: "lora r16", "full", "last-block"."""
    return f"lora r{lora_rank}" if method == "lora" else method


def mlflow_key(name: str) -> str:
    """`name` with every character MLflow refuses in a metric name (e.g. from a class name) as `_`."""
    return _MLFLOW_UNSAFE.sub("_", name)


def time_metrics(result: TrainResult) -> dict[str, float]:
    """What a training stage's time metrics mean, in their names.

    `train_time_s`: seconds in training steps over every session of the run (a resumed run adds
    up its sessions); `session_wall_time_s`: this execution of the stage, evaluation and
    checkpointing included; `session_steps`: optimizer steps this execution trained (0 when it
    found a finished checkpoint of the same params, data and code and reused it).
    """
    return {
        "train_time_s": result.train_time_s,
        "session_wall_time_s": result.wall_time_s,
        "session_steps": result.step - (result.resumed_from_step or 0),
        "steps": result.step,
    }


def write_loss_plots(
    result: TrainResult, csv_path: Path, png_path: Path, columns: Iterable[str], title: str
) -> None:
    """The stage's DVC plot table (CSV) and its book-style PNG, each written atomically."""
    plots.write_plot_csv(result.history, csv_path, tuple(columns))
    plots.plot_losses(result.history, png_path, title=title)


def finish_run(
    run: Any,
    trainer: Trainer,
    result: TrainResult,
    metrics: Mapping[str, float],
    metrics_path: Path,
    artifacts: Iterable[Path],
) -> None:
    """Write `metrics` as the stage's DVC metrics and log them (nested sections as dotted keys), the artifacts
    and config.json."""
    fileio.write_json(metrics_path, dict(metrics))
    run.log_metrics({mlflow_key(f"final_{k}"): v for k, v in flatten(dict(metrics)).items()}, step=result.step)
    paths = [*artifacts, metrics_path]
    if trainer.out_dir is not None:
        paths.append(trainer.out_dir / CONFIG_FILE)
    for path in paths:
        run.log_artifact(path)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
