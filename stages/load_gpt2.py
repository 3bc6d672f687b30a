"""DVC stage `load-gpt2`: the base model of the fine-tuning stages, in models/base/.

Reads the `load_gpt2` section of params.yaml (and the network settings of `download` for official
weights). `base` is `pretrain` (models/pretrain, this pipeline's own model), an official size
(gpt2-small|gpt2-medium|gpt2-large|gpt2-xl: OpenAI's weights from the Hugging Face hub at a pinned
revision, verified by sha256; with SCRATCHGPT_MIRROR=DIR they come from DIR/<size>.safetensors), an
http(s) URL with `load_gpt2.sha256`, or a local Hugging Face / book / scratchgpt checkpoint.

Writes models/base/ (model.safetensors + config.json recording the source, revision and hash) and
metrics/load_gpt2.json (parameters, val loss and perplexity on the pretraining val windows), and
logs one MLflow run with the base's greedy continuation of the start context.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from scratchgpt.data.datasets import DatasetError
from scratchgpt.data.download import DownloadError, DownloadParams
from scratchgpt.nn.checkpoint import CheckpointError
from scratchgpt.pipeline.load_gpt2 import LoadGPT2Params, LoadGPT2Paths, run_load_gpt2
from scratchgpt.pipeline.stage import StageError
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section
from scratchgpt.plumbing.tracking import TrackingError

log = logging.getLogger("stages.load_gpt2")


def main(argv: list[str] | None = None) -> None:
    defaults = LoadGPT2Paths()
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--pretrain-dir", type=Path, default=defaults.pretrain_dir, help="base 'pretrain' checkpoint")
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="pretraining val windows")
    parser.add_argument("--vocab-dir", type=Path, default=defaults.vocab_dir, help="vocab.bpe + encoder.json")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where the base model goes")
    parser.add_argument("--metrics", type=Path, default=defaults.metrics, help="metrics JSON to write")
    args = parser.parse_args(argv)
    cli.setup_logging()
    paths = LoadGPT2Paths(args.pretrain_dir, args.data_dir, args.vocab_dir, args.out_dir, args.metrics)

    def run() -> dict:
        params = load_section(LoadGPT2Params, "load_gpt2", args.params)
        network = load_section(DownloadParams, "download", args.params)
        download = dataclasses.replace(
            network, out_dir=params.weights_dir, partial_dir=f"{params.weights_dir.rstrip('/')}.partial"
        )
        return run_load_gpt2(params, download, paths)

    errors = (ParamsError, DownloadError, CheckpointError, StageError, FileNotFoundError, DatasetError, TrackingError)
    metrics = cli.run_stage(run, errors, log)
    log.info(
        "base: %d parameters, val loss %.3f (perplexity %.1f)",
        metrics["parameters"], metrics["val_loss"], metrics["val_perplexity"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
