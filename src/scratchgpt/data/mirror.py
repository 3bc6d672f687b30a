"""Build a data mirror: a verified copy of every source file, for offline runs and the test suite.

    python -m scratchgpt.mirror DIR                     # all sources
    python -m scratchgpt.mirror DIR --sources the-verdict gpt2-vocab-bpe
    SCRATCHGPT_MIRROR=DIR dvc repro                     # then use it
    SCRATCHGPT_MIRROR=DIR python -m pytest

DIR gets each file of `scratchgpt.data.sources.SOURCES` as `DIR/<basename of its URL>`, the layout that
`SCRATCHGPT_MIRROR` expects; an archive is stored as the archive itself. Files are fetched from their
canonical URLs with the download stage's resuming HTTP client (an interrupted transfer waits in
DIR/.partial/ and the next run continues it) and appear under their name only once verified: against
the pinned sha256, or for an archive whose own hash is not pinned, by extracting and checking its
pinned member. A file already in DIR that verifies is kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from scratchgpt.plumbing import cli
from scratchgpt.data.download import ChecksumError, DownloadError, DownloadParams, extract_member, fetch_url
from scratchgpt.plumbing.fileio import sha256_file
from scratchgpt.data.sources import SOURCES, Source

log = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"


def verify_raw(source: Source, path: Path, max_member_bytes: int, digest: str | None = None) -> None:
    """Check a file as served at `source.url`: its pinned sha256, and for an archive its pinned member.

    `digest` is the file's sha256 when already known. Raises ChecksumError (or another DownloadError
    for an unreadable or unsafe archive).
    """
    digest = digest or sha256_file(path)
    if source.sha256 is not None and digest != source.sha256:
        raise ChecksumError(f"{path} (from {source.url})", source.sha256, digest)
    if source.member is not None:
        with tempfile.TemporaryDirectory() as tmp:
            extract_member(
                path,
                source.member,
                Path(tmp) / source.filename,
                expected_sha256=source.output_sha256,
                max_bytes=max_member_bytes,
            )


def mirror_source(source: Source, mirror: Path, params: DownloadParams) -> str:
    """Put a verified copy of `source.url` at `mirror/<basename>`; return "existing" or "url"."""
    dest = mirror / source.basename
    if dest.is_file():
        try:
            verify_raw(source, dest, params.max_member_bytes)
            log.info("%s: %s already present and verified", source.name, dest)
            return "existing"
        except DownloadError as exc:
            log.warning("%s: %s; fetching it again", source.name, exc)
            dest.unlink()
    part = mirror / PARTIAL_DIR / f"{source.basename}.part"
    log.info("%s: downloading %s", source.name, source.url)
    digest = fetch_url(source.url, part, **params.http_options())
    try:
        verify_raw(source, part, params.max_member_bytes, digest)
    except DownloadError:
        part.unlink()  # bad content: resuming it could never pass the check
        raise
    os.replace(part, dest)
    log.info("%s: wrote %s (sha256 %s)", source.name, dest, digest)
    return "url"


def build_mirror(
    mirror: str | os.PathLike[str],
    sources: Iterable[Source] = SOURCES.values(),
    params: DownloadParams | None = None,
) -> dict[str, str]:
    """Mirror `sources` into directory `mirror` (created); return `{basename: "url" | "existing"}`.

    Stops at the first source that cannot be fetched or verified; the files done so far stay.
    """
    mirror = Path(mirror)
    mirror.mkdir(parents=True, exist_ok=True)
    params = params or DownloadParams()
    origins = {source.basename: mirror_source(source, mirror, params) for source in sources}
    partial = mirror / PARTIAL_DIR
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return origins


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("dir", type=Path, help="the mirror directory (created if missing)")
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=list(SOURCES),
        default=list(SOURCES),
        metavar="NAME",
        help=f"sources to mirror (default: all of {', '.join(SOURCES)})",
    )
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        origins = build_mirror(args.dir, [SOURCES[name] for name in args.sources])
    except DownloadError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    log.info("%d file(s) verified in %s; use it with SCRATCHGPT_MIRROR=%s", len(origins), args.dir, args.dir.resolve())


if __name__ == "__main__":
    main()
