"""Pretraining a GPT on the token windows of the sample stage (the book's chapter 5, as a stage).

`PretrainParams` is the `pretrain` section of params.yaml; `run_pretrain` does the whole stage:
validate, build the model and datasets, train with `scratchgpt.train.trainer.Trainer` (resumable,
DDP-ready), then write metrics, the loss-curve CSV and PNG, and track everything in MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchgpt.data.datasets import SampleParams, TokenWindowDataset
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.generate import text_sampler
from scratchgpt.nn.model import PRESETS, GPTConfig, GPTModel
from scratchgpt.pipeline import stage
from scratchgpt.plumbing import tracking
from scratchgpt.plumbing.params import ParamsError, check_choice, check_int, check_str
from scratchgpt.train import distributed
from scratchgpt.train.callbacks import TrackingCallback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.losses import lm_loss
from scratchgpt.train.state import seed_everything
from scratchgpt.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

STAGE = "pretrain"
PLOT_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss")


@dataclass
class ModelParams:
    """The architecture: a named `GPTConfig` preset, with any field overridden (null = the preset's)."""

    preset: str = "cpu-small"
    """gpt2-small | gpt2-medium | gpt2-large | gpt2-xl | cpu-small (see scratchgpt.nn.model.PRESETS)."""
    context_length: int | None = None
    """Longest sequence the model accepts; must be >= sample.max_length."""
    emb_dim: int | None = None
    """Width of the residual stream."""
    n_heads: int | None = None
    """Attention heads; must divide emb_dim."""
    n_layers: int | None = None
    """Transformer blocks."""
    drop_rate: float | None = None
    """Dropout rate during training."""
    qkv_bias: bool | None = None
    """Bias on the query/key/value projections."""
    tie_weights: bool | None = None
    """Share the output head with the token embedding."""

    def __post_init__(self) -> None:
        check_choice(self, "preset", sorted(PRESETS))
        self.config()  # validates the overrides (GPTConfig checks every field)

    def overrides(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }

    def config(self) -> GPTConfig:
        return GPTConfig.from_name(self.preset, **self.overrides())


@dataclass
class PretrainParams:
    """The `pretrain` section of params.yaml."""

    preset: str = "cpu"
    """Name of the parameter preset in use ("cpu" here, "book" from presets/book.yaml); an MLflow tag."""
    model: ModelParams = field(default_factory=ModelParams)
    """Architecture of the model trained from scratch."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, batching, evaluation, checkpointing, device and precision."""
    start_context: str = "Every effort moves you"
    """Prompt continued greedily at each epoch end, to watch the model learn."""
    sample_tokens: int = 50
    """Tokens generated for that sample."""

    def __post_init__(self) -> None:
        check_str(self, "preset")
        if not isinstance(self.model, ModelParams) or not isinstance(self.train, TrainConfig):
            raise ValueError("model and train must be mappings")
        check_str(self, "start_context")
        check_int(self, "sample_tokens", 0)


@dataclass(frozen=True)
class PretrainPaths:
    """Where the stage reads and writes (relative to the project root, as in dvc.yaml)."""

    data_dir: Path = Path("data/processed/pretrain")  # train.parquet, val.parquet
    vocab_dir: Path = Path("data/raw")  # vocab.bpe, encoder.json
    out_dir: Path = Path("models/pretrain")
    metrics: Path = Path("metrics/pretrain.json")
    plot_csv: Path = Path("plots/pretrain_loss.csv")
    plot_png: Path = Path("plots/pretrain_loss.png")


def check_params(params: PretrainParams, sample: SampleParams) -> GPTConfig:
    """Cross-section checks before any work; returns the model config."""
    cfg = params.model.config()
    if cfg.context_length < sample.max_length:
        raise ParamsError(
            f"pretrain.model.context_length ({cfg.context_length}) is shorter than the training "
            f"windows (sample.max_length = {sample.max_length}); raise it or lower sample.max_length"
        )
    return cfg


def run_pretrain(
    params: PretrainParams,
    sample: SampleParams,
    paths: PretrainPaths = PretrainPaths(),
) -> dict[str, float] | None:
    """Run the stage; returns the metrics written (None on DDP ranks other than 0)."""
    stage.check_tracking()
    cfg = check_params(params, sample)
    split_files = {split: paths.data_dir / f"{split}.parquet" for split in ("train", "val")}
    stage.require_files(split_files.values(), "sample-to-parquet")
    code = stage.code_digest(STAGE)
    with stage.made_by("sample-to-parquet", paths.data_dir):
        train_ds = TokenWindowDataset(paths.data_dir / "train.parquet")
        val_ds = TokenWindowDataset(paths.data_dir / "val.parquet")
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if ds.max_length > cfg.context_length:
            raise ParamsError(
                f"{ds.path}: windows of {ds.max_length} tokens exceed pretrain.model.context_length "
                f"({cfg.context_length}); rerun the sample stage or raise the context length"
            )
        if len(ds) == 0:
            raise ValueError(f"{ds.path} holds no windows: the {name} split is too short for max_length")
    tokenizer = gpt2_tokenizer(paths.vocab_dir)
    if cfg.vocab_size < tokenizer.n_vocab:
        raise ParamsError(
            f"pretrain.model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.n_vocab}"
        )

    info, _ = distributed.setup(params.train.device)
    seed_everything(params.train.seed)
    model = GPTModel(cfg)
    data = stage.data_digest(split_files)
    log.info(
        "pretraining a %s model (%s parameters) on %d train / %d val windows of %d tokens",
        params.model.preset,
        f"{model.num_parameters():,}",
        len(train_ds),
        len(val_ds),
        train_ds.max_length,
    )

    tracked = {"pretrain": params, "sample": sample}
    details = [f"{params.model.preset or 'custom'} {model.num_parameters() / 1e6:.1f}M"]
    with tracking.stage_run(STAGE, tracked, preset=params.preset, enabled=info.is_main, details=details) as run:
        trainer = Trainer(
            model,
            lm_loss,
            train_ds,
            val_ds,
            params.train,
            paths.out_dir,
            callbacks=[TrackingCallback(run)],
            sampler=text_sampler(
                lambda s: tokenizer.encode(s, allowed_special={"<|endoftext|>"}),
                tokenizer.decode,
                params.start_context,
                params.sample_tokens,
            ),
            fingerprint={"model": cfg.to_dict(), "data": data, "code": code},
            checkpoint_extra={"pretrain": dataclasses.asdict(params), "data_sha256": data},
            desc=STAGE,
        )
        result = trainer.fit()
        if not info.is_main:
            return None
        metrics = stage_metrics(result, model.num_parameters())
        stage.write_loss_plots(result, paths.plot_csv, paths.plot_png, PLOT_COLUMNS, "Pretraining loss")
        stage.finish_run(run, trainer, result, metrics, paths.metrics, (paths.plot_png, paths.plot_csv))
        run.log_text(_samples_text(result), "samples/all_epochs.txt")
    return metrics


def stage_metrics(result: TrainResult, n_params: int) -> dict[str, float]:
    """What `metrics/pretrain.json` reports."""
    final = result.final
    return {
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "val_perplexity": math.exp(min(final["val_loss"], 700.0)),
        "tokens_seen": result.tokens_seen,
        "epochs": result.epochs,
        "tokens_per_s": result.tokens_per_s,
        "parameters": n_params,
        **stage.time_metrics(result),
    }


def _samples_text(result: TrainResult) -> str:
    return "".join(f"epoch {s['epoch']} (step {s['step']}):\n{s['text']}\n\n" for s in result.samples)

