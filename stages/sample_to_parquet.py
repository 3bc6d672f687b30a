"""DVC stage `sample-to-parquet`: turn the tokenized tables into the training datasets.

Reads the `sample` section of params.yaml and --in-dir (the tokenize stage's output). Writes:

  <out-dir>/pretrain/{train,val}.parquet     sliding windows of max_length + 1 tokens (column `window`)
  <out-dir>/spam/{train,val,test}.parquet    balanced, shuffled 70/10/20 split of the spam table
  <out-dir>/instruct/{train,val,test}.parquet file-order 85/10/5 split (train/test/val) of the instructions

and windows and rows per split to --metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from scratchgpt import cli
from scratchgpt.corpus import read_tokens
from scratchgpt.datasets import (
    DatasetError,
    SampleParams,
    split_instructions,
    split_spam,
    write_pretrain_windows,
    write_splits,
)
from scratchgpt.fileio import write_json
from scratchgpt.params import ParamsError, load_section

log = logging.getLogger("stages.sample_to_parquet")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--in-dir", default="data/interim", help="tokenize stage output (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/processed", help="output directory (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/sample.json", help="metrics JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    src, out = Path(args.in_dir), Path(args.out_dir)
    try:
        p = load_section(SampleParams, "sample", args.params)
        log.info("params: %s", p)
        tokens = read_tokens(src / "pretrain_tokens.parquet")
        spam = split_spam(
            pq.read_table(src / "spam.parquet"), seed=p.seed, train_ratio=p.spam_train_ratio, val_ratio=p.spam_val_ratio
        )
        instruct = split_instructions(
            pq.read_table(src / "instruct.parquet"),
            train_ratio=p.instruct_train_ratio,
            test_ratio=p.instruct_test_ratio,
        )
        log.info("windowing %d tokens: max_length %d, stride %d", len(tokens), p.max_length, p.stride)
        pretrain = write_pretrain_windows(
            tokens, out / "pretrain", max_length=p.max_length, stride=p.stride, train_ratio=p.train_ratio
        )
    except (OSError, ParamsError, DatasetError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    metrics = {
        "pretrain": {**pretrain, "max_length": p.max_length, "stride": p.stride},
        "spam": write_splits(spam, out / "spam"),
        "instruct": write_splits(instruct, out / "instruct"),
    }
    write_json(args.metrics, metrics)
    log.info("wrote %s and %s: %s", out, args.metrics, metrics)


if __name__ == "__main__":
    main()
