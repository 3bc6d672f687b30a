"""The `tokenize` stage: encode the inputs with GPT-2's tokenizer into Parquet tables.

`TokenizeParams` is the `tokenize` section of params.yaml: the pretraining corpus, the labelled texts
(`scratchgpt.data.labelled`) and the instruction data (`scratchgpt.data.instruction_data`), each the
book's files in data/raw/ by default or your own in data/external/ (`scratchgpt.data.inputs`).
`run_tokenize` checks every input first (size bound, UTF-8, columns, labels, records), then writes,
replacing the output directory as a whole:

  pretrain_tokens.parquet  the corpus token stream (column `token`), documents separated by <|endoftext|>
  cls.parquet              text, label (class index; the names in its metadata), token_ids [, split]
  instruct.parquet         instruction, input, output, prompt, response, prompt_ids, response_ids [, split]

and the counts to the metrics file (the labelled texts under `spam` for the book's SMS data, else `cls`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from scratchgpt.data.corpus import DEFAULT_CHUNK_BYTES, check_corpus_entry, corpus_files, encode_corpus
from scratchgpt.data.datasets import build_instruction_table, read_label_info
from scratchgpt.data.instruction_data import InstructionDataParams, read_instruction_data
from scratchgpt.data.labelled import LabelledDataParams, build_labelled_table, table_metrics
from scratchgpt.data.records import check_size
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.plumbing.fileio import atomic_dir, write_json
from scratchgpt.plumbing.params import check_int

log = logging.getLogger(__name__)


@dataclass
class TokenizeParams:
    """`tokenize` section of params.yaml."""

    corpus: list[Any] = field(default_factory=lambda: ["data/raw/the-verdict.txt"])
    """The pretraining corpus, documents joined by <|endoftext|> in order. Each entry is a file, a directory
    or a glob (text files are one document each; .parquet, .jsonl, .json, .csv, .tsv files one per row of their
    `text` column), or a mapping {path, column, format} naming another column."""
    classification: LabelledDataParams = field(default_factory=LabelledDataParams)
    """The labelled texts of the classifier."""
    instruct: InstructionDataParams = field(default_factory=InstructionDataParams)
    """The instruction data."""
    max_file_bytes: int = 1 << 30
    """Largest input file read; a bigger one is refused before any work (the labelled texts, instruction
    records and table-format corpus files are read whole)."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Bytes of text per encode call. Does not change the output (chunks are cut where GPT-2's
    pre-tokenizer splits anyway); bounds memory at about 3 * num_threads chunks."""
    num_threads: int = 0
    """Encoder threads; 0 = one per CPU. Does not change the output."""

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, list):
            raise ValueError(f"corpus must be a list of files, directories or globs, got {self.corpus!r}")
        if not self.corpus:
            raise ValueError("corpus is empty: list at least one text file")
        for i, entry in enumerate(self.corpus):
            check_corpus_entry(entry, f"corpus[{i}]")
        for name, cls in (("classification", LabelledDataParams), ("instruct", InstructionDataParams)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a mapping")
        check_int(self, "max_file_bytes", 1)
        check_int(self, "chunk_bytes", 1)
        check_int(self, "num_threads", 0)


def run_tokenize(params: TokenizeParams, raw_dir: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict:
    """Check and tokenize the labelled texts, the instructions and the corpus; write the tables and the metrics;
    return these."""
    enc = gpt2_tokenizer(raw_dir)
    # Every input is checked before the long corpus pass: bad data fails the stage before anything is written.
    corpus = corpus_files(params.corpus)
    for f in corpus:
        check_size(f.path, params.max_file_bytes)
    log.info("tokenizing %s and %s", ", ".join(params.classification.files()), ", ".join(params.instruct.files()))
    labelled = build_labelled_table(params.classification, enc, params.max_file_bytes)
    records, own = read_instruction_data(params.instruct, params.max_file_bytes)
    instruct = build_instruction_table(records, enc, train_records=own)
    log.info("tokenizing the pretraining corpus: %d file(s) from %s", len(corpus), ", ".join(map(str, params.corpus)))
    start = time.perf_counter()
    with atomic_dir(out_dir) as out:
        stats = encode_corpus(
            corpus,
            enc,
            out / "pretrain_tokens.parquet",
            chunk_bytes=params.chunk_bytes,
            num_threads=params.num_threads or None,
        )
        pq.write_table(labelled, out / "cls.parquet", compression="zstd")
        pq.write_table(instruct, out / "instruct.parquet", compression="zstd")
    seconds = time.perf_counter() - start
    log.info("corpus: %.1f MB in %.2f s (%.1f MB/s)", stats.bytes / 1e6, seconds, stats.bytes / 1e6 / seconds)

    instruct_metrics = {
        "records": own,
        "prompt_tokens": sum(len(ids) for ids in instruct.column("prompt_ids").to_pylist()),
        "response_tokens": sum(len(ids) for ids in instruct.column("response_ids").to_pylist()),
    }
    if own < instruct.num_rows:
        instruct_metrics["test_records"] = instruct.num_rows - own
    metrics = {
        **stats.metrics(),
        read_label_info(labelled).dataset: table_metrics(labelled),
        "instruct": instruct_metrics,
    }
    write_json(metrics_path, metrics)
    log.info("wrote %s and %s: %s", out_dir, metrics_path, stats.metrics())
    return metrics
