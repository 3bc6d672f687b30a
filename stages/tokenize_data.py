"""DVC stage `tokenize`: encode the inputs with GPT-2's tokenizer into Parquet tables.

Reads the `tokenize` section of params.yaml: the corpus, the labelled texts and the instruction data it
names (the download stage's files in data/raw/, or your own in data/external/), and the vocabulary in
--raw-dir. Checks every input first (bad data: one line naming the file, row or line, and column; nothing
written), then writes, replacing --out-dir as a whole:

  pretrain_tokens.parquet  the corpus token stream (column `token`), documents separated by <|endoftext|>
  cls.parquet              text, label (class index; the class names in its metadata), token_ids
  instruct.parquet         instruction, input, output, prompt, response, prompt_ids, response_ids

and the counts to --metrics. The code: `scratchgpt.pipeline.tokenize`.

(The script is not called `tokenize.py`: Python puts the script's directory first on sys.path,
and a `tokenize.py` there would shadow the standard library module of that name.)
"""

from __future__ import annotations

import logging

from scratchgpt.data.corpus import CorpusError
from scratchgpt.data.datasets import DatasetError
from scratchgpt.data.tokenizer import VocabFileError
from scratchgpt.pipeline.tokenize import TokenizeParams, run_tokenize
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section

log = logging.getLogger("stages.tokenize_data")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--raw-dir", default="data/raw", help="downloaded inputs (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/interim", help="output directory (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/tokenize.json", help="metrics JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def run() -> dict:
        params = load_section(TokenizeParams, "tokenize", args.params)
        return run_tokenize(params, args.raw_dir, args.out_dir, args.metrics)

    cli.run_stage(run, (OSError, ParamsError, VocabFileError, CorpusError, DatasetError), log)


if __name__ == "__main__":
    main()
