"""The `download` stage: fetch the sources into data/raw, each verified by sha256, and record where each came from.

`run_download` fetches from the network, or from `$SCRATCHGPT_MIRROR` when it is set (same checksums; offline
without a mirror it fails after one retry, saying how to make and use one), and
writes the manifest (per file: source name, bytes, sha256, origin url|mirror|existing, the archive's hash) and
the metrics (numbers only: files, bytes, files per origin).
"""

from __future__ import annotations

import logging
from pathlib import Path

from scratchgpt.data.download import (
    MIRROR_ENV,
    DownloadParams,
    OfflineError,
    download_all,
    manifest,
    metrics,
    mirror_from_env,
)
from scratchgpt.plumbing.fileio import write_json

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    f"This machine looks offline. Without the network, set {MIRROR_ENV}=DIR to a directory holding copies of the "
    f"source files (each checked against the same sha256); build one where the network works with `python -m "
    f"scratchgpt.mirror DIR` and copy it over (docs/data-sources.md)"
)


def run_download(params: DownloadParams, manifest_path: str | Path, metrics_path: str | Path) -> dict:
    """Fetch `params.sources` into `params.out_dir`; write the manifest and the metrics; return the metrics."""
    mirror = mirror_from_env()
    where = f"mirror {mirror} ({MIRROR_ENV})" if mirror else "the network"
    log.info("fetching %d source(s) from %s into %s", len(params.sources), where, params.out_dir)
    try:
        records = download_all(params, mirror=mirror)
    except OfflineError as exc:
        raise OfflineError(f"{exc}. {OFFLINE_HINT}") from exc
    numbers = metrics(records)
    write_json(manifest_path, manifest(records))
    write_json(metrics_path, numbers)
    log.info("wrote %s and %s: %d files, %d bytes", manifest_path, metrics_path, len(records),
             sum(r.bytes for r in records))  # fmt: skip
    return numbers
