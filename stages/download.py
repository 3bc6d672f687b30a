"""DVC stage `download`: fetch the source files into data/raw/, each verified by sha256.

Reads the `download` section of params.yaml. With SCRATCHGPT_MIRROR=DIR set, files come from
DIR/<basename of their URL> instead of the network (same checksums). Writes data/raw-manifest.json
(per file: source name, bytes, sha256, origin url|mirror|existing, the archive's hash) and
metrics/download.json (numbers only: files, bytes, files per origin).
"""

from __future__ import annotations

import logging

from scratchgpt.data.download import DownloadError, DownloadParams
from scratchgpt.data.sources import SOURCES
from scratchgpt.pipeline.download import run_download
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, load_section

log = logging.getLogger("stages.download")


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(
        __doc__,
        params=True,
        epilog="sources (name: URL):\n" + "\n".join(f"  {s.name}: {s.url}" for s in SOURCES.values()),
    )
    parser.add_argument(
        "--metrics", default="metrics/download.json", help="metrics JSON to write (default: %(default)s)"
    )
    parser.add_argument(
        "--manifest", default="data/raw-manifest.json", help="names and hashes of the files (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    cli.setup_logging()

    def run() -> dict:
        return run_download(load_section(DownloadParams, "download", args.params), args.manifest, args.metrics)

    cli.run_stage(run, (ParamsError, DownloadError), log)


if __name__ == "__main__":
    main()
