"""The `sample-to-parquet` stage: turn the tokenized tables into the training datasets.

`run_sample_to_parquet` reads the tokenize stage's tables and writes:

  <out>/pretrain/{train,val}.parquet     sliding windows of max_length + 1 tokens (column `window`)
  <out>/cls/{train,val,test}.parquet     the labelled texts: the book's balanced, shuffled 70/10/20 split of the
                                         SMS data, or as `sample.balance`/`stratify` say (given splits kept)
  <out>/instruct/{train,val,test}.parquet file-order 85/10/5 split (train/test/val) of the instructions

and windows and rows per split to the metrics file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from scratchgpt.data.corpus import read_tokens
from scratchgpt.data.datasets import (
    SampleParams,
    read_label_info,
    split_instructions,
    write_pretrain_windows,
    write_splits,
)
from scratchgpt.data.labelled import split_labelled
from scratchgpt.plumbing.fileio import write_json

log = logging.getLogger(__name__)


def run_sample_to_parquet(p: SampleParams, in_dir: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict:
    """Split and window the tables of `in_dir` into `out_dir`; write the metrics and return them."""
    src, out = Path(in_dir), Path(out_dir)
    log.info("params: %s", p)
    tokens = read_tokens(src / "pretrain_tokens.parquet")
    labelled = pq.read_table(src / "cls.parquet")
    cls = split_labelled(labelled, seed=p.seed, train_ratio=p.cls_train_ratio, val_ratio=p.cls_val_ratio,
                         balance=p.balance, stratify=p.stratify)  # fmt: skip
    instruct = split_instructions(
        pq.read_table(src / "instruct.parquet"),
        train_ratio=p.instruct_train_ratio,
        test_ratio=p.instruct_test_ratio,
    )
    log.info("windowing %d tokens: max_length %d, stride %d", len(tokens), p.max_length, p.stride)
    pretrain = write_pretrain_windows(
        tokens, out / "pretrain", max_length=p.max_length, stride=p.stride, train_ratio=p.train_ratio
    )
    metrics = {
        "pretrain": {**pretrain, "max_length": p.max_length, "stride": p.stride},
        read_label_info(labelled).dataset: write_splits(cls, out / "cls"),
        "instruct": write_splits(instruct, out / "instruct"),
    }
    write_json(metrics_path, metrics)
    log.info("wrote %s and %s: %s", out, metrics_path, metrics)
    return metrics
