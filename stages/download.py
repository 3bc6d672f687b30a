"""DVC stage `download`: fetch the source files into data/raw/, each verified by sha256.

Reads the `download` section of params.yaml. With SCRATCHGPT_MIRROR=DIR set, files come from
DIR/<basename of their URL> instead of the network (same checksums). Writes data/raw-manifest.json
(per file: source name, bytes, sha256, origin url|mirror|existing, the archive's hash) and
metrics/download.json (numbers only: files, bytes, files per origin).
"""

from __future__ import annotations

import logging

from scratchgpt import cli
from scratchgpt.download import (
    MIRROR_ENV,
    DownloadError,
    DownloadParams,
    download_all,
    manifest,
    metrics,
    mirror_from_env,
)
from scratchgpt.fileio import write_json
from scratchgpt.params import ParamsError, load_section
from scratchgpt.sources import SOURCES

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

    try:
        params = load_section(DownloadParams, "download", args.params)
        mirror = mirror_from_env()
        where = f"mirror {mirror} ({MIRROR_ENV})" if mirror else "the network"
        log.info("fetching %d source(s) from %s into %s", len(params.sources), where, params.out_dir)
        records = download_all(params, mirror=mirror)
    except (ParamsError, DownloadError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    write_json(args.manifest, manifest(records))
    write_json(args.metrics, metrics(records))
    log.info("wrote %s and %s: %d files, %d bytes", args.manifest, args.metrics, len(records),
             sum(r.bytes for r in records))  # fmt: skip


if __name__ == "__main__":
    main()
