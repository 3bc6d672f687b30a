"""DVC stage `lora-cls-finetune`: fine-tune models/base into a classifier (book ch. 6 and appendix E).

Reads the `cls` section of params.yaml, models/base/ (from load-gpt2) and data/processed/cls/
{train,val,test}.parquet (the labelled texts: the book's SMS spam, or yours; the class names come with
them). `cls.mode` is lora (LoRA adapters on every linear layer, the new head included; all else frozen),
last-block (the last transformer block, the final norm and the head) or full. Writes models/<cls.name>/
(merged weights, config.json with the class names, the GPT-2 vocabulary; the book's: spam-classifier),
metrics/cls.json (train/val/test accuracy, test precision/recall/F1 of the positive class, or macro and per
class, trainable parameters, examples/s, times), plots/cls_{loss,accuracy}.{csv,png} and
plots/cls_confusion.png, logs one MLflow run and registers the classifier as <cls.name>.

Checkpoints go to models/<cls.name>-ckpt/ (a persistent DVC output): with `cls.train.resume: auto` a
killed run continues from its last one; one made with other params, base, data or code is not reused.
Use the classifier with `python -m scratchgpt.classify "text"`.

Distributed: `cls.train.nproc: N` (the script relaunches itself under `torchrun --standalone
--nproc_per_node N`), or `torchrun --standalone --nproc_per_node N stages/lora_cls_finetune.py` by hand.
"""

from __future__ import annotations

import logging

from scratchgpt.data.datasets import DatasetError
from scratchgpt.nn.checkpoint import CheckpointError
from scratchgpt.pipeline.lora_cls_finetune import ClsParams, run_lora_cls_finetune
from scratchgpt.pipeline.stage import StageError
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section
from scratchgpt.plumbing.tracking import TrackingError
from scratchgpt.train import distributed
from scratchgpt.train.state import CheckpointMismatchError
from scratchgpt.train.trainer import NonFiniteLossError

log = logging.getLogger("stages.lora_cls_finetune")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True)
    args = parser.parse_args(argv)
    cli.setup_stage_logging()
    errors = (ParamsError, DatasetError, CheckpointError, StageError, FileNotFoundError, NonFiniteLossError,
              CheckpointMismatchError, TrackingError)  # fmt: skip

    def run() -> dict[str, float] | None:
        params = load_section(ClsParams, "cls", args.params)
        distributed.launch(params.train.nproc)  # cls.train.nproc > 1: rerun this script under torchrun
        return run_lora_cls_finetune(params)

    metrics = cli.run_stage(run, errors, log, cleanup=distributed.teardown)
    if metrics is not None:
        f1 = ("F1", metrics["test_f1"]) if "test_f1" in metrics else ("macro-F1", metrics["test_macro_f1"])
        log.info(
            "test accuracy %.4f, %s %.4f; %d trainable parameters (%.2f%%), %.0f examples/s",
            metrics["test_accuracy"], *f1, metrics["trainable_parameters"],
            100 * metrics["trainable_share"], metrics["examples_per_s"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
