"""DVC stage `tokenize`: encode the downloaded texts with GPT-2's tokenizer into Parquet tables.

Reads the `tokenize` section of params.yaml and the files the download stage left in --raw-dir
(vocab.bpe, encoder.json, SMSSpamCollection, instruction-data.json and the corpus files). Writes,
replacing --out-dir as a whole:

  pretrain_tokens.parquet  the corpus token stream (column `token`), documents separated by <|endoftext|>
  spam.parquet             text, label (ham 0 / spam 1), token_ids
  instruct.parquet         instruction, input, output, prompt, response, prompt_ids, response_ids

and the counts to --metrics.

(The script is not called `tokenize.py`: Python puts the script's directory first on sys.path,
and a `tokenize.py` there would shadow the standard library module of that name.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from scratchgpt import cli
from scratchgpt.corpus import CorpusError, TokenizeParams, encode_corpus
from scratchgpt.datasets import DatasetError, build_instruction_table, build_spam_table
from scratchgpt.fileio import atomic_dir, write_json
from scratchgpt.params import ParamsError, load_section
from scratchgpt.tokenizer import VocabFileError, gpt2_tokenizer

log = logging.getLogger("stages.tokenize_data")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--raw-dir", default="data/raw", help="downloaded inputs (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/interim", help="output directory (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/tokenize.json", help="metrics JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    raw = Path(args.raw_dir)
    try:
        params = load_section(TokenizeParams, "tokenize", args.params)
        enc = gpt2_tokenizer(raw)
        # The small tables first: bad records fail the stage before the long corpus pass.
        log.info("tokenizing %s and %s", raw / "SMSSpamCollection", raw / "instruction-data.json")
        spam = build_spam_table(raw / "SMSSpamCollection", enc)
        instruct = build_instruction_table(raw / "instruction-data.json", enc)
        log.info("tokenizing the pretraining corpus: %s", ", ".join(params.corpus))
        start = time.perf_counter()
        with atomic_dir(args.out_dir) as out:
            stats = encode_corpus(
                params.corpus,
                enc,
                out / "pretrain_tokens.parquet",
                chunk_bytes=params.chunk_bytes,
                num_threads=params.num_threads or None,
            )
            pq.write_table(spam, out / "spam.parquet", compression="zstd")
            pq.write_table(instruct, out / "instruct.parquet", compression="zstd")
    except (OSError, ParamsError, VocabFileError, CorpusError, DatasetError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
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
    write_json(args.metrics, metrics)
    log.info("wrote %s and %s: %s", args.out_dir, args.metrics, stats.metrics())


if __name__ == "__main__":
    main()
