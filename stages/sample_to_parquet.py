"""DVC stage `sample-to-parquet`: turn the tokenized tables into the training datasets.

Reads the `sample` section of params.yaml and --in-dir (the tokenize stage's output). Writes:

  <out-dir>/pretrain/{train,val}.parquet     sliding windows of max_length + 1 tokens (column `window`)
  <out-dir>/cls/{train,val,test}.parquet     the labelled texts: the book's balanced, shuffled 70/10/20 split
                                             of its SMS data, or as sample.balance and sample.stratify say
  <out-dir>/instruct/{train,val,test}.parquet file-order 85/10/5 split (train/test/val) of the instructions

and windows and rows per split to --metrics.
"""

from __future__ import annotations

import logging

from scratchgpt.data.datasets import DatasetError, SampleParams
from scratchgpt.pipeline.sample_to_parquet import run_sample_to_parquet
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section

log = logging.getLogger("stages.sample_to_parquet")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True)
    parser.add_argument("--in-dir", default="data/interim", help="tokenize stage output (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/processed", help="output directory (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/sample.json", help="metrics JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def run() -> dict:
        params = load_section(SampleParams, "sample", args.params)
        return run_sample_to_parquet(params, args.in_dir, args.out_dir, args.metrics)

    cli.run_stage(run, (OSError, ParamsError, DatasetError), log)


if __name__ == "__main__":
    main()
