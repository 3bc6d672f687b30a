"""DVC stage `pretrain`: train a GPT from scratch on the sample stage's token windows (book ch. 5).

Reads the `pretrain` and `sample` sections of params.yaml and data/processed/pretrain/{train,val}.parquet
(plus the GPT-2 vocabulary in data/raw for the epoch-end text samples). Writes the checkpoint
models/pretrain/ (model.safetensors, config.json, trainer_state.pt), metrics/pretrain.json and
plots/pretrain_loss.{csv,png}, and logs one MLflow run.

With `pretrain.train.resume: auto` a killed run continues from its last checkpoint (models/pretrain
is a persistent DVC output); a checkpoint made with other params, data or training code is not
resumed from: training starts afresh and overwrites it.

Distributed (gloo on CPU, NCCL on GPU): `pretrain.train.nproc: N` makes the script relaunch itself under
`torchrun --standalone --nproc_per_node N`; or start it by hand with that command.
"""

from __future__ import annotations

import logging
from pathlib import Path

from scratchgpt.data.datasets import DatasetError, SampleParams
from scratchgpt.pipeline.pretrain import PretrainParams, PretrainPaths, run_pretrain
from scratchgpt.pipeline.stage import StageError
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section
from scratchgpt.plumbing.tracking import TrackingError
from scratchgpt.train import distributed
from scratchgpt.train.state import CheckpointMismatchError
from scratchgpt.train.trainer import NonFiniteLossError

log = logging.getLogger("stages.pretrain")


def main(argv: list[str] | None = None) -> None:
    defaults = PretrainPaths()
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="train/val Parquet windows")
    parser.add_argument("--vocab-dir", type=Path, default=defaults.vocab_dir, help="vocab.bpe + encoder.json")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="checkpoint directory")
    parser.add_argument("--metrics", type=Path, default=defaults.metrics, help="metrics JSON to write")
    parser.add_argument("--plot-csv", type=Path, default=defaults.plot_csv, help="loss curve table (DVC plot)")
    parser.add_argument("--plot-png", type=Path, default=defaults.plot_png, help="loss curve image")
    args = parser.parse_args(argv)
    cli.setup_stage_logging()

    paths = PretrainPaths(
        data_dir=args.data_dir,
        vocab_dir=args.vocab_dir,
        out_dir=args.out_dir,
        metrics=args.metrics,
        plot_csv=args.plot_csv,
        plot_png=args.plot_png,
    )

    def run() -> dict[str, float] | None:
        params = load_section(PretrainParams, "pretrain", args.params)
        sample = load_section(SampleParams, "sample", args.params)
        distributed.launch(params.train.nproc)  # train.nproc > 1: rerun this script under torchrun
        return run_pretrain(params, sample, paths)

    errors = (ParamsError, NonFiniteLossError, CheckpointMismatchError, StageError, FileNotFoundError,
              DatasetError, TrackingError)  # fmt: skip
    metrics = cli.run_stage(run, errors, log, cleanup=distributed.teardown)
    if metrics is not None:
        log.info(
            "final train loss %.3f, val loss %.3f (perplexity %.1f), %d tokens at %.0f tokens/s",
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_perplexity"],
            metrics["tokens_seen"],
            metrics["tokens_per_s"],
        )


if __name__ == "__main__":
    main()
