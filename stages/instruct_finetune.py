"""DVC stage `instruct-finetune`: fine-tune models/base to follow instructions (book ch. 7).

Reads the `instruct` section of params.yaml, models/base/ (from load-gpt2) and
data/processed/instruct/{train,val,test}.parquet (Alpaca-format prompts and responses as token ids).
`instruct.method` is full (every weight, as the book) or lora. Writes models/instruct/ (merged weights,
config.json, the GPT-2 vocabulary), data/responses/instruct_test.json (each test record with the model's
greedy response: the book's fields instruction, input, output, model_response), metrics/instruct.json,
plots/instruct_loss.{csv,png}, and logs one MLflow run.

Checkpoints go to models/instruct-ckpt/ (a persistent DVC output): with `instruct.train.resume: auto` a
killed run continues from its last one; one made with other params, base, data or code is not reused.
Talk to the model with `python -m scratchgpt.chat --model models/instruct`.

Distributed: `instruct.train.nproc: N` (the script relaunches itself under `torchrun --standalone
--nproc_per_node N`), or `torchrun --standalone --nproc_per_node N stages/instruct_finetune.py` by hand.
"""

from __future__ import annotations

import logging

from scratchgpt.data.datasets import DatasetError
from scratchgpt.nn.checkpoint import CheckpointError
from scratchgpt.pipeline.instruct_finetune import InstructParams, run_instruct_finetune
from scratchgpt.pipeline.stage import StageError
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section
from scratchgpt.plumbing.tracking import TrackingError
from scratchgpt.train import distributed
from scratchgpt.train.state import CheckpointMismatchError
from scratchgpt.train.trainer import NonFiniteLossError

log = logging.getLogger("stages.instruct_finetune")


def main(argv: list[str] | None = None) -> None:
    args = cli.parser(__doc__, params=True).parse_args(argv)
    cli.setup_stage_logging()
    errors = (ParamsError, DatasetError, CheckpointError, StageError, FileNotFoundError, NonFiniteLossError,
              CheckpointMismatchError, ValueError, TrackingError)  # fmt: skip

    def run() -> dict[str, float] | None:
        params = load_section(InstructParams, "instruct", args.params)
        distributed.launch(params.train.nproc)  # instruct.train.nproc > 1: rerun this script under torchrun
        return run_instruct_finetune(params)

    metrics = cli.run_stage(run, errors, log, cleanup=distributed.teardown)
    if metrics is not None:
        log.info(
            "final train loss %.3f, val loss %.3f; %d test responses at %.0f tokens/s",
            metrics["train_loss"], metrics["val_loss"], metrics["test_responses"], metrics["response_tokens_per_s"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
