"""The `tokenize` stage: encode the downloaded texts with GPT-2's tokenizer into Parquet tables.

`run_tokenize` reads the download stage's files (vocab.bpe, encoder.json, SMSSpamCollection,
instruction-data.json and the corpus files) and writes, replacing the output directory as a whole:

  pretrain_tokens.parquet  the corpus token stream (column `token`), documents separated by <|endoftext|>
  spam.parquet             text, label (ham 0 / spam 1), token_ids
  instruct.parquet         instruction, input, output, prompt, response, prompt_ids, response_ids

and the counts to the metrics file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from scratchgpt.data.corpus import TokenizeParams, encode_corpus
from scratchgpt.data.datasets import build_instruction_table, build_spam_table
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.plumbing.fileio import atomic_dir, write_json

log = logging.getLogger(__name__)


def run_tokenize(params: TokenizeParams, raw_dir: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict:
    """Tokenize the spam table, the instructions and the corpus; write the tables and the metrics; return these."""
    raw = Path(raw_dir)
    enc = gpt2_tokenizer(raw)
    # The small tables first: bad records fail the stage before the long corpus pass.
    log.info("tokenizing %s and %s", raw / "SMSSpamCollection", raw / "instruction-data.json")
    spam = build_spam_table(raw / "SMSSpamCollection", enc)
    instruct = build_instruction_table(raw / "instruction-data.json", enc)
    log.info("tokenizing the pretraining corpus: %s", ", ".join(params.corpus))
    start = time.perf_counter()
    with atomic_dir(out_dir) as out:
        stats = encode_corpus(
            params.corpus,
            enc,
            out / "pretrain_tokens.parquet",
            chunk_bytes=params.chunk_bytes,
            num_threads=params.num_threads or None,
        )
        pq.write_table(spam, out / "spam.parquet", compression="zstd")
        pq.write_table(instruct, out / "instruct.parquet", compression="zstd")
    seconds = time.perf_counter() - start
    log.info("corpus: %.1f MB in %.2f s (%.1f MB/s)", stats.bytes / 1e6, seconds, stats.bytes / 1e6 / seconds)

    labels = spam.column("label").to_numpy()
    metrics = {
        **stats.metrics(),
        "spam": {
            "rows": spam.num_rows,
            "ham": int((labels == 0).sum()),
            "spam": int((labels == 1).sum()),
            "tokens": sum(len(ids) for ids in spam.column("token_ids").to_pylist()),
        },
        "instruct": {
            "records": instruct.num_rows,
            "prompt_tokens": sum(len(ids) for ids in instruct.column("prompt_ids").to_pylist()),
            "response_tokens": sum(len(ids) for ids in instruct.column("response_ids").to_pylist()),
        },
    }
    write_json(metrics_path, metrics)
    log.info("wrote %s and %s: %s", out_dir, metrics_path, stats.metrics())
    return metrics
