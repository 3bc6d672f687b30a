"""Instruction fine-tuning: the `instruct-finetune` stage (the book's chapter 7).

`InstructParams` is the `instruct` section of params.yaml; `run_instruct_finetune` does the whole stage:
load `models/base`, train it on the Alpaca-format instruction split with the shared `Trainer` (all
weights, or LoRA adapters), save the merged model to `models/instruct`, then answer every test
instruction with batched, KV-cached generation and write the book's response file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from scratchgpt.apps import serving
from scratchgpt.apps.instruct import InstructionDataset, answer_prompts, instruction_collate
from scratchgpt.data.tokenizer import ENCODER_JSON, VOCAB_BPE, gpt2_tokenizer
from scratchgpt.nn import checkpoint, lora
from scratchgpt.nn.generate import text_sampler
from scratchgpt.nn.model import GPTModel
from scratchgpt.pipeline import stage
from scratchgpt.plumbing import fileio, tracking
from scratchgpt.plumbing.params import check_bool, check_choice, check_int, check_number, check_ratio, check_str
from scratchgpt.train import distributed
from scratchgpt.train.callbacks import TrackingCallback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.losses import lm_loss
from scratchgpt.train.state import seed_everything
from scratchgpt.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

STAGE = "instruct-finetune"
METHODS = ("full", "lora")
PLOT_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss")


@dataclass
class InstructParams:
    """The `instruct` section of params.yaml."""

    preset: str = "cpu"
    """Name of the parameter preset in use (an MLflow tag)."""
    method: str = "full"
    """full: train every weight (the book); lora: LoRA adapters on every linear layer, all else frozen."""
    lora_rank: int = 16
    """Rank of the LoRA matrices (method lora)."""
    lora_alpha: float = 16.0
    """LoRA updates are scaled by alpha / rank."""
    mask_prompt: bool = False
    """Learn the response only: the prompt's targets are ignored (the book's exercise 7.2)."""
    allowed_max_length: int = 1024
    """Examples are cut to this many tokens (and to the base's context length)."""
    drop_rate: float = 0.0
    """Dropout while fine-tuning (the book: 0)."""
    max_new_tokens: int = 256
    """Longest test response generated (the book: 256); generation also stops at end-of-text."""
    temperature: float = 0.0
    """0: greedy (the book); above 0: sampling with this temperature (seeded by train.seed)."""
    generate_batch_size: int = 16
    """Test prompts generated together."""
    batch_mean_loss: bool = False
    """Also report the book's train/val losses (`train_loss_batch_mean`, `val_loss_batch_mean`): the mean over
    evaluation batches of each batch's token mean, which depends on batch_size. train_loss and val_loss are
    token means. The book preset sets it, to compare with the losses the book prints."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, batching, evaluation, checkpointing, device and precision."""

    def __post_init__(self) -> None:
        check_str(self, "preset")
        check_choice(self, "method", METHODS)
        lora.check_hyperparameters(self.lora_rank, self.lora_alpha)
        check_bool(self, "mask_prompt")
        check_int(self, "allowed_max_length", 2)
        check_ratio(self, "drop_rate", zero=True)
        check_int(self, "max_new_tokens", 1)
        check_number(self, "temperature", 0)
        check_int(self, "generate_batch_size", 1)
        check_bool(self, "batch_mean_loss")
        if not isinstance(self.train, TrainConfig):
            raise ValueError("train must be a mapping")


@dataclass(frozen=True)
class InstructPaths:
    """Where the stage reads and writes (relative to the project root, as in dvc.yaml)."""

    base_dir: Path = Path("models/base")
    data_dir: Path = Path("data/processed/instruct")
    vocab_dir: Path = Path("data/raw")
    checkpoint_dir: Path = Path("models/instruct-ckpt")
    out_dir: Path = Path("models/instruct")
    responses: Path = Path("data/responses/instruct_test.json")
    metrics: Path = Path("metrics/instruct.json")
    plot_csv: Path = Path("plots/instruct_loss.csv")
    plot_png: Path = Path("plots/instruct_loss.png")


def build_model(params: InstructParams, base_dir: Path) -> GPTModel:
    """The base, dropout set for fine-tuning, with LoRA adapters for method lora."""
    model = checkpoint.load_model(base_dir, config_overrides={"drop_rate": params.drop_rate})
    if params.method == "lora":
        lora.apply_lora(model, params.lora_rank, params.lora_alpha)  # a tied head is untied when merged
    return model.train()


def run_instruct_finetune(
    params: InstructParams, paths: InstructPaths = InstructPaths()
) -> dict[str, float] | None:
    """Run the stage; returns the metrics written (None on DDP ranks other than 0)."""
    stage.check_tracking()
    stage.require_files([paths.base_dir / checkpoint.WEIGHTS_FILE], "load-gpt2")
    splits = stage.load_splits(paths.data_dir, InstructionDataset)
    with stage.made_by("load-gpt2", paths.base_dir):
        context = checkpoint.load_config(paths.base_dir)["model"]["context_length"]
    if params.max_new_tokens >= context:
        raise ValueError(f"instruct.max_new_tokens ({params.max_new_tokens}) must be below the base's context "
                         f"length ({context})")  # fmt: skip
    tokenizer = gpt2_tokenizer(paths.vocab_dir)
    data = {split: ds.path for split, ds in splits.items()}
    fingerprint = stage.finetune_fingerprint(STAGE, "instruct", params, paths.base_dir, data)
    info, _ = distributed.setup(params.train.device)
    seed_everything(params.train.seed)
    with stage.made_by("load-gpt2", paths.base_dir):
        model = build_model(params, paths.base_dir)
    trainable, total = lora.count_parameters(model)
    log.info(
        "instruction fine-tuning (%s) of a %s-parameter base (%s trainable) on %d train / %d val examples",
        params.method, f"{total:,}", f"{trainable:,}", len(splits["train"]), len(splits["val"]),
    )  # fmt: skip
    collate = instruction_collate(allowed_max_length=min(params.allowed_max_length, context),
                                  mask_prompt=params.mask_prompt)  # fmt: skip
    first_val = splits["val"].prompts[0].tolist()  # answered after each epoch, as the book does
    sample_tokens = min(35, context - len(first_val))
    sampler = text_sampler(lambda _: first_val, tokenizer.decode, "", sample_tokens) if sample_tokens > 0 else None

    details = [stage.method_label(params.method, params.lora_rank), "masked prompt" if params.mask_prompt else ""]
    with tracking.stage_run(STAGE, {"instruct": params}, preset=params.preset, enabled=info.is_main,
                            details=details) as run:  # fmt: skip
        trainer = Trainer(
            model, lm_loss, splits["train"], splits["val"], params.train, paths.checkpoint_dir,
            collate_fn=collate, callbacks=[TrackingCallback(run)], sampler=sampler,
            fingerprint=fingerprint, checkpoint_extra={"instruct": dataclasses.asdict(params)}, desc=STAGE,
            batch_mean_loss=params.batch_mean_loss,
        )  # fmt: skip
        result = trainer.fit()
        if not info.is_main:
            return None
        if params.method == "lora":
            lora.merge_lora(model)
        model.eval()
        save_instruct_model(model, paths, params)
        started = time.perf_counter()
        responses = generate_responses(model, splits["test"], tokenizer, params)
        gen_time = time.perf_counter() - started
        fileio.write_text(paths.responses, json.dumps(responses, indent=4) + "\n")  # the book's field order
        new_tokens = sum(len(tokenizer.encode(r["model_response"])) for r in responses)
        metrics = stage_metrics(result, trainable, total, len(responses), new_tokens, gen_time)
        stage.write_loss_plots(result, paths.plot_csv, paths.plot_png, PLOT_COLUMNS, "Instruction fine-tuning")
        artifacts = (paths.plot_png, paths.plot_csv, paths.responses)
        stage.finish_run(run, trainer, result, metrics, paths.metrics, artifacts)
        run.log_text(_samples_text(result), "samples/all_epochs.txt")
        serving.log_instruct_model(run, paths.out_dir, metrics, max_new_tokens=params.max_new_tokens,
                                   temperature=params.temperature,
                                   tags={"method": params.method, "preset": params.preset})
    return metrics


def save_instruct_model(model: GPTModel, paths: InstructPaths, params: InstructParams) -> None:
    """The merged model, its config (with the base's source) and the GPT-2 vocabulary, as one directory."""
    extra = {"instruct": dataclasses.asdict(params), "base": checkpoint.load_config(paths.base_dir).get("source")}
    with fileio.atomic_dir(paths.out_dir) as tmp:
        checkpoint.save_model(model, tmp, extra=extra)  # copies the weights to the CPU
        for name in (VOCAB_BPE, ENCODER_JSON):
            shutil.copyfile(paths.vocab_dir / name, tmp / name)


def generate_responses(model: GPTModel, test: InstructionDataset, tokenizer, params: InstructParams) -> list[dict]:
    """The book's response file: each test record with the model's response to its prompt."""
    import torch

    generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(params.train.seed)
    answers = answer_prompts(model, tokenizer, [p.tolist() for p in test.prompts], max_new_tokens=params.max_new_tokens,
                             batch_size=params.generate_batch_size, temperature=params.temperature,
                             generator=generator)  # fmt: skip
    return [{**record, "model_response": answer} for record, answer in zip(test.records, answers, strict=True)]


def stage_metrics(result: TrainResult, trainable: int, total: int, n_responses: int, new_tokens: int,
                  gen_time: float) -> dict[str, float]:  # fmt: skip
    """What `metrics/instruct.json` reports (numbers only)."""
    book = {k: result.final[k] for k in ("train_loss_batch_mean", "val_loss_batch_mean") if k in result.final}
    return {
        "train_loss": result.final["train_loss"],
        "val_loss": result.final["val_loss"],
        **book,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "test_responses": n_responses,
        "response_tokens_per_s": new_tokens / gen_time if gen_time > 0 else 0.0,
        "response_time_s": gen_time,
        **stage.time_metrics(result),
    }


def _samples_text(result: TrainResult) -> str:
    return "".join(f"epoch {s['epoch']} (step {s['step']}):\n{s['text']}\n\n" for s in result.samples)
