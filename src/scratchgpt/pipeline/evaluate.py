"""Evaluation of the instruction-following model: the `evaluate` stage (the book's section 7.8).

`EvaluateParams` is the `evaluate` section of params.yaml; `run_evaluate` does the whole stage:
- checks its inputs and, when a judge is chosen, that the judge answers (JudgeError naming the URL),
  before any work;
- on the test split: the response-token loss (the mean over every response token) and perplexity of
  models/instruct (prompt targets masked, as `instruction_collate(mask_prompt=True)`), and, for the
  responses the instruct-finetune stage wrote, exact match (after whitespace normalization) and ROUGE-L
  against the references;
- the judge's 0-100 score of each response (`scratchgpt.pipeline.judge`), when a judge is chosen; each
  verdict is kept in data/judge-cache.jsonl as it arrives, so a rerun after a kill asks only for the rest;
- the pipeline's headline numbers from the other stages' metrics files (a missing file is reported,
  not fatal);
- writes metrics/eval.json, reports/eval.md and reports/eval_scores.json, and logs one MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch.utils.data import Subset

from scratchgpt.apps.instruct import InstructionDataset, instruction_collate
from scratchgpt.data.datasets import INSTRUCTION_KEYS, DatasetError
from scratchgpt.nn import checkpoint
from scratchgpt.nn.model import GPTModel
from scratchgpt.pipeline import report, stage
from scratchgpt.pipeline.judge import JUDGES, Judge, JudgeCache, Judgement, OllamaJudge, judge_all, summarize
from scratchgpt.pipeline.openai_judge import OpenAIJudge
from scratchgpt.plumbing import fileio, tracking
from scratchgpt.plumbing.params import check_choice, check_int, check_number, check_str, flatten
from scratchgpt.train import distributed
from scratchgpt.train.evaluation import evaluate_dataset
from scratchgpt.train.losses import lm_loss

log = logging.getLogger(__name__)

STAGE = "evaluate"
RESPONSE_KEY = "model_response"


@dataclass
class EvaluateParams:
    """The `evaluate` section of params.yaml."""

    judge: str = "none"
    """none: no judge (exact match and ROUGE-L only) | ollama: a model served by Ollama scores each response 0-100
    | openai: a model behind any OpenAI-compatible API (vLLM, llama.cpp's server, LM Studio, a hosted API) does."""
    url: str = "http://localhost:11434"
    """The judge's server: Ollama's address, or the OpenAI-compatible API's base URL (e.g. http://localhost:8000/v1)."""
    model: str = "llama3"
    """The judge model, as the server names it (the book: llama3, Llama 3 8B)."""
    api_key_env: str = "OPENAI_API_KEY"
    """judge openai: the environment variable holding the API key (sent as a bearer token; unset: none is sent).
    The key itself is never logged or written."""
    timeout: float = 120.0
    """Seconds one judge request may wait (to connect, and for each read); the first one may load the model."""
    retries: int = 3
    """Retries of a judge request after a timeout, a lost connection or a 5xx/429 answer."""
    backoff: float = 1.0
    """Seconds before the first retry, doubling with each (at most 30 s)."""
    batch_size: int = 8
    """Test examples per forward pass for the response loss."""
    examples_in_report: int = 5
    """Test responses shown beside their references in the report, and as many best and worst."""
    device: str = "auto"
    """auto | cpu | cuda | mps: where the response loss is computed."""

    def __post_init__(self) -> None:
        check_choice(self, "judge", JUDGES)
        check_str(self, "url")
        if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).hostname:
            raise ValueError(f"url must be an http(s) URL such as http://localhost:11434, got {self.url!r}")
        check_str(self, "model")
        if not isinstance(self.api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, got {self.api_key_env!r}")
        check_number(self, "timeout", 0, exclusive=True)
        check_int(self, "retries", 0)
        check_number(self, "backoff", 0)
        check_int(self, "batch_size", 1)
        check_int(self, "examples_in_report", 0)
        check_choice(self, "device", distributed.DEVICES)


@dataclass(frozen=True)
class EvaluatePaths:
    """Where the stage reads and writes (relative to the project root, as in dvc.yaml)."""

    model_dir: Path = Path("models/instruct")
    responses: Path = Path("data/responses/instruct_test.json")
    test_split: Path = Path("data/processed/instruct/test.parquet")
    metrics_dir: Path = Path("metrics")
    plots_dir: Path = Path("plots")
    metrics: Path = Path("metrics/eval.json")
    report: Path = Path("reports/eval.md")
    scores: Path = Path("reports/eval_scores.json")
    judge_cache: Path = Path("data/judge-cache.jsonl")
    """The judge's verdicts so far (not a DVC output): a rerun after a kill asks only for the rest."""


@dataclass(frozen=True)
class Headline:
    """A number of another stage that the report and metrics/eval.json repeat."""

    section: str
    """Its section in metrics/eval.json."""
    file: str
    """The metrics file it comes from (in `metrics_dir`)."""
    stage: str
    """The stage that writes that file."""
    key: str
    """Its key there."""
    label: str
    """What it is, in the report."""
    optional: bool = False
    """Only some runs have it (the classifier reports the positive class's F1 or the macro-F1): absent, it is
    left out rather than reported missing."""


HEADLINES = (
    Headline("pretrain", "pretrain.json", "pretrain", "val_loss", "validation loss"),
    Headline("pretrain", "pretrain.json", "pretrain", "val_perplexity", "validation perplexity"),
    Headline("cls", "cls.json", "lora-cls-finetune", "test_accuracy", "classifier test accuracy"),
    Headline("cls", "cls.json", "lora-cls-finetune", "test_f1", "classifier test F1 (positive class)", True),
    Headline("cls", "cls.json", "lora-cls-finetune", "test_macro_f1", "classifier test macro-F1", True),
    Headline("instruct", "instruct.json", "instruct-finetune", "train_loss", "train loss"),
    Headline("instruct", "instruct.json", "instruct-finetune", "val_loss", "validation loss"),
)
PLOTS = (
    ("pretrain_loss.png", "Pretraining loss", "pretrain"),
    ("cls_loss.png", "Classifier fine-tuning loss", "lora-cls-finetune"),
    ("cls_accuracy.png", "Classifier accuracy", "lora-cls-finetune"),
    ("instruct_loss.png", "Instruction fine-tuning loss", "instruct-finetune"),
)
CONFUSION_PNG = "cls_confusion.png"


# --------------------------------------------------------------------------------------------
# Scores that need no judge


def normalize(text: str) -> str:
    """`text` without leading/trailing whitespace and with every run of whitespace as one space."""
    return " ".join(text.split())


def exact_match(response: str, reference: str) -> bool:
    """Equal after `normalize` (case, punctuation and wording must match)."""
    return normalize(response) == normalize(reference)


def rouge_l(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each response against its reference (rouge-score: lower-cased, Porter-stemmed,
    non-alphanumeric characters dropped; an empty response scores 0)."""
    from rouge_score import rouge_scorer, tokenizers

    # The scorer's own default tokenizer, passed in: made by the scorer, it logs "Using default tokenizer."
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    return [
        scorer.score(reference, response)["rougeL"].fmeasure
        for response, reference in zip(responses, references, strict=True)
    ]


def response_loss(
    model: GPTModel, test: InstructionDataset, batch_size: int, device: torch.device
) -> tuple[float, int, int]:
    """Mean cross-entropy of the response tokens (and the end-of-text after them) given the prompt.

    Examples are cut to the model's context; one whose prompt fills the context has no response
    target left and is left out. The mean is over every response token of the examples used
    (`train.evaluation.evaluate_dataset`), so it does not depend on `batch_size`. Returns the loss,
    the examples used and the tokens it averages over.
    """
    context = model.cfg.context_length
    usable = [i for i, prompt in enumerate(test.prompts) if len(prompt) <= context]
    if not usable:
        raise DatasetError(f"{test.path}: every test prompt is longer than the model's context ({context})")
    collate = instruction_collate(mask_prompt=True, allowed_max_length=context)
    subset = Subset(test, usable) if len(usable) < len(test) else test
    loss = evaluate_dataset(model, subset, lm_loss, batch_size=batch_size, device=device, collate_fn=collate)["loss"]
    tokens = sum(lm_loss.units(collate([subset[i]])) for i in range(len(subset)))
    return loss, len(usable), tokens


# --------------------------------------------------------------------------------------------
# Inputs


def read_responses(path: Path, test_records: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The instruct-finetune stage's response file, checked against the test split it answers."""
    redo = "rerun the instruct-finetune stage (dvc repro instruct-finetune)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); {redo}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if len(data) != len(test_records):
        raise DatasetError(
            f"{path} holds {len(data)} responses but the test split has {len(test_records)} records; {redo}"
        )
    out = []
    for index, (record, expected) in enumerate(zip(data, test_records, strict=True)):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: record {index} is a {type(record).__name__}, not an object")
        for key in (*INSTRUCTION_KEYS, RESPONSE_KEY):
            if not isinstance(record.get(key), str):
                raise DatasetError(f"{path}: record {index} has no string {key!r}")
        differs = [key for key in INSTRUCTION_KEYS if record[key] != expected[key]]
        if differs:
            raise DatasetError(
                f"{path}: record {index} does not match the test split ({', '.join(differs)} differ): "
                f"the responses answer other data; {redo}"
            )
        out.append({key: record[key] for key in (*INSTRUCTION_KEYS, RESPONSE_KEY)})
    return out


def gather_headlines(metrics_dir: Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The other stages' headline numbers by section, and a line for each that is not available."""
    values: dict[str, dict[str, float]] = {}
    problems: list[str] = []
    files: dict[str, dict | None] = {}
    for h in HEADLINES:
        path = metrics_dir / h.file
        if h.file not in files:
            files[h.file] = _read_metrics(path, h.stage, problems)
        data = files[h.file]
        if data is None:
            continue
        value = data.get(h.key)
        if value is None and h.optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{path} has no number {h.key!r}")
            continue
        values.setdefault(h.section, {})[h.key] = float(value)
    return values, problems


def _read_metrics(path: Path, producer: str, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path} not found (run `dvc repro {producer}`)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{path} is not valid JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is not a JSON object")
        return None
    return data


def classifier_classes(metrics_dir: Path) -> dict[str, dict[str, float]] | None:
    """Each class's test precision, recall, F1 and support from metrics/cls.json (a classifier on your own
    labels), or None."""
    path = metrics_dir / "cls.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8")).get("test_class")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # gather_headlines reports what is wrong with the file
    return classes if isinstance(classes, dict) and classes else None


def base_record(model_dir: Path) -> dict[str, Any] | None:
    """Where the instruction model's base came from (`base` or `source` in its config.json), if recorded."""
    config = checkpoint.load_config(model_dir)
    record = config.get("base") or config.get("source")
    return record if isinstance(record, dict) else None


# --------------------------------------------------------------------------------------------
# The stage


def make_judge(params: EvaluateParams) -> Judge | None:
    """The chosen judge, checked to answer (JudgeError naming the URL otherwise); None for judge: none."""
    if params.judge == "none":
        return None
    options = {"timeout": params.timeout, "retries": params.retries, "backoff": params.backoff}
    if params.judge == "openai":
        judge: Judge = OpenAIJudge(params.url, params.model, api_key_env=params.api_key_env, **options)
    else:
        judge = OllamaJudge(params.url, params.model, **options)
    try:
        judge.probe()
    except BaseException:
        judge.close()
        raise
    log.info("judge: %s", judge.describe())
    return judge


def run_evaluate(params: EvaluateParams, paths: EvaluatePaths = EvaluatePaths()) -> dict[str, Any]:
    """Run the stage; returns the metrics written."""
    stage.check_tracking()
    stage.require_files([paths.model_dir / checkpoint.WEIGHTS_FILE, paths.responses], "instruct-finetune")
    stage.require_files([paths.test_split], "sample-to-parquet")
    with stage.made_by("sample-to-parquet", paths.test_split):
        test = InstructionDataset(paths.test_split)
    if len(test) == 0:
        raise DatasetError(f"{paths.test_split}: the test split is empty")
    records = read_responses(paths.responses, test.records)
    device = distributed.resolve_device(params.device)
    with stage.made_by("instruct-finetune", paths.model_dir):
        base = base_record(paths.model_dir)
        model = checkpoint.load_model(paths.model_dir, map_location=device)
    judge = make_judge(params)  # before any work: an unusable judge fails here
    try:
        tags = {"judge": params.judge if judge is None else judge.describe()}
        details = ["no judge" if judge is None else f"judge {params.model}"]
        with tracking.stage_run(STAGE, {"evaluate": params}, tags=tags, details=details) as run:
            return _evaluate(params, paths, test, records, base, model, device, judge, run)
    finally:
        if judge is not None:
            judge.close()


def _evaluate(params, paths, test, records, base, model, device, judge, run) -> dict[str, Any]:
    loss, loss_examples, loss_tokens = response_loss(model, test, params.batch_size, device)
    context = model.cfg.context_length
    log.info("test response loss %.4f (perplexity %.2f): the mean over %d response tokens of %d examples", loss,
             _exp(loss), loss_tokens, loss_examples)  # fmt: skip

    responses = [r[RESPONSE_KEY] for r in records]
    references = [r["output"] for r in records]
    rouge = rouge_l(responses, references)
    exact = [exact_match(a, b) for a, b in zip(responses, references, strict=True)]
    judgements: list[Judgement] | None = None
    if judge is not None:
        log.info("judging %d responses with %s", len(records), judge.describe())
        judgements = judge_all(judge, records, total=len(records), cache=JudgeCache(paths.judge_cache, judge))

    per_example = [
        {"index": i, **record, "exact_match": exact[i], "rouge_l": rouge[i], **_judge_fields(judgements, i)}
        for i, record in enumerate(records)
    ]
    counts = Counter(normalize(r) for r in responses)
    test_metrics = {
        "examples": len(records),
        "response_loss": loss,
        "response_perplexity": _exp(loss),
        "loss_examples": loss_examples,
        "loss_tokens": loss_tokens,
        "truncated_examples": sum(len(ex) > context for ex in test.examples),
        "exact_match": sum(exact) / len(exact),
        "rouge_l": sum(rouge) / len(rouge),
        "distinct_responses": len(counts),
        "empty_responses": counts.get("", 0),
    }
    headlines, problems = gather_headlines(paths.metrics_dir)
    metrics: dict[str, Any] = {**headlines, "test": test_metrics}
    if judgements is not None:
        metrics["judge"] = summarize(judgements)
        log.info("judge: %s", metrics["judge"])
    for problem in problems:
        log.warning("%s", problem)

    text = report.render_eval_report(
        metrics=metrics,
        headlines=[(h, headlines.get(h.section, {}).get(h.key)) for h in HEADLINES
                   if not h.optional or h.key in headlines.get(h.section, {})],
        classes=classifier_classes(paths.metrics_dir),
        confusion=_plot_link(paths, CONFUSION_PNG),
        problems=problems,
        examples=per_example,
        plots=_plot_links(paths),
        base=base,
        model_parameters=model.num_parameters(),
        context_length=context,
        judge=judge.describe() if judge is not None else None,
        judge_options=judge.options if judge is not None else {},
        shown=params.examples_in_report,
        files={"model": paths.model_dir, "responses": paths.responses, "test": paths.test_split,
               "scores": paths.scores},
    )
    fileio.write_json(paths.metrics, metrics)
    fileio.write_text(paths.report, text)
    fileio.write_text(paths.scores, json.dumps(per_example, indent=2, ensure_ascii=False) + "\n")

    run.log_metrics(flatten(metrics))
    if base is not None:
        run.set_tags({f"base.{k}": v for k, v in base.items()})
    run.log_artifact(paths.metrics)
    run.log_artifact(paths.report, "reports")
    run.log_artifact(paths.scores, "reports")
    for png, _, _ in PLOTS:  # beside the report as in the repository, so its relative links work
        if (paths.plots_dir / png).is_file():
            run.log_artifact(paths.plots_dir / png, "plots")
    run.log_artifact(paths.model_dir / checkpoint.CONFIG_FILE)
    log.info("wrote %s, %s, %s", paths.metrics, paths.report, paths.scores)
    return metrics


def _judge_fields(judgements: list[Judgement] | None, index: int) -> dict[str, Any]:
    if judgements is None:
        return {}
    j = judgements[index]
    return {"judge_status": j.status, "judge_score": j.score, "judge_reply": j.reply, "judge_error": j.error,
            "judge_attempts": j.attempts}  # fmt: skip


def _plot_links(paths: EvaluatePaths) -> list[tuple[str, str | None, str]]:
    """(title, link relative to the report or None when missing, the stage that draws it) per plot."""
    return [(title, _plot_link(paths, png), producer) for png, title, producer in PLOTS]


def _plot_link(paths: EvaluatePaths, png: str) -> str | None:
    path = paths.plots_dir / png
    return Path(os.path.relpath(path, paths.report.parent)).as_posix() if path.is_file() else None


def _exp(loss: float) -> float:
    return math.exp(min(loss, 700.0))
