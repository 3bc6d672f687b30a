"""DVC stage `evaluate`: score the instruction-following model and write the pipeline's report (book 7.8).

Reads the `evaluate` section of params.yaml, models/instruct/ and data/responses/instruct_test.json
(from instruct-finetune), data/processed/instruct/test.parquet, and the headline numbers in
metrics/{pretrain,cls,instruct}.json (a missing one is reported, not fatal).

Always computed: the response-token loss and perplexity of the model on the test split, exact match
(after whitespace normalization) and ROUGE-L (rouge-score, stemmed) of the responses against the
references. With `evaluate.judge: ollama` a model served by Ollama (`evaluate.url`, `evaluate.model`;
default http://localhost:11434 and llama3) also scores each response 0-100 with the book's prompt; a
judge that cannot be reached stops the stage before any work, naming the URL.

Writes metrics/eval.json, reports/eval.md (tables, the training plots, responses beside their
references, the best and worst), reports/eval_scores.json (per example), and logs one MLflow run.
"""

from __future__ import annotations

import logging

from scratchgpt.data.datasets import DatasetError
from scratchgpt.nn.checkpoint import CheckpointError
from scratchgpt.pipeline.evaluate import EvaluateParams, run_evaluate
from scratchgpt.pipeline.judge import JudgeError
from scratchgpt.pipeline.stage import StageError
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section
from scratchgpt.plumbing.tracking import TrackingError

log = logging.getLogger("stages.evaluate")


def main(argv: list[str] | None = None) -> None:
    args = cli.parser(__doc__, params=True).parse_args(argv)
    cli.setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per judge request
    errors = (ParamsError, DatasetError, CheckpointError, StageError, FileNotFoundError, JudgeError,
              TrackingError)  # fmt: skip
    metrics = cli.run_stage(lambda: run_evaluate(load_section(EvaluateParams, "evaluate", args.params)), errors, log)
    test, judge = metrics["test"], metrics.get("judge")
    log.info(
        "test response loss %.3f (perplexity %.1f), exact match %.1f %%, ROUGE-L %.3f%s",
        test["response_loss"], test["response_perplexity"], 100 * test["exact_match"], test["rouge_l"],
        f", judge score {judge['mean_score']:.2f} ({judge['judged']} scored)" if judge and "mean_score" in judge
        else "",
    )  # fmt: skip


if __name__ == "__main__":
    main()
