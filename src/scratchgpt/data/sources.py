"""The public files the pipeline starts from: one declaration per source, with pinned checksums.

Each `Source` says where a file lives (`url`), what it must hash to, and the name it gets under the
download stage's output directory. Archives also name the single member to extract and that member's
own hash. The mirror (`SCRATCHGPT_MIRROR=DIR`) holds each file as `DIR/<basename of its URL>`.

The SMS Spam Collection is pinned by its extracted member only: the zip served by UCI and the
re-packed zip in the offline mirror hold the same `SMSSpamCollection` bytes but differ as archives,
so `sha256` is None for the archive itself (the download stage records the archive hash it actually
saw in the download manifest, `data/raw-manifest.json`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Source:
    """One downloadable file."""

    name: str
    """The key used in params.yaml (`download.sources`)."""
    url: str
    """Canonical location."""
    filename: str
    """File written under the output directory."""
    sha256: str | None
    """Hash of the file at `url`; None where only the archive member is pinned."""
    member: str | None = None
    """For archives: the one member to extract (a path inside the zip)."""
    member_sha256: str | None = None
    """Hash of the extracted member."""
    mirror_name: str | None = None
    """Name in a mirror directory, where URLs share a basename (model weights); default: the URL's basename."""

    def __post_init__(self) -> None:
        if self.member is None and self.sha256 is None:
            raise ValueError(f"source {self.name!r}: a plain file needs a sha256")
        if self.member is not None and self.member_sha256 is None:
            raise ValueError(f"source {self.name!r}: archive member {self.member!r} needs a member_sha256")
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"source {self.name!r}: filename must be a plain file name, got {self.filename!r}")

    @property
    def basename(self) -> str:
        """The file's name in a mirror directory (and of its partial download): `mirror_name` if set,
        else the last path component of the URL."""
        return self.mirror_name or posixpath.basename(unquote(urlsplit(self.url).path))

    @property
    def is_archive(self) -> bool:
        return self.member is not None

    @property
    def output_sha256(self) -> str:
        """The hash the file at `filename` must have (the member's, for an archive)."""
        digest = self.member_sha256 if self.member is not None else self.sha256
        assert digest is not None  # guaranteed by __post_init__
        return digest


_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="the-verdict",
            url=f"{_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
            filename="the-verdict.txt",
            sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        ),
        Source(
            name="sms-spam-collection",
            url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            filename="SMSSpamCollection",
            sha256=None,  # the UCI zip and the mirror's re-pack differ; the member is pinned
            member="SMSSpamCollection",
            member_sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        ),
        Source(
            name="instruction-data",
            url=f"{_BOOK}/ch07/01_main-chapter-code/instruction-data.json",
            filename="instruction-data.json",
            sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        ),
        Source(
            name="gpt2-vocab-bpe",
            url=f"{_GPT2}/vocab.bpe",
            filename="vocab.bpe",
            sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        Source(
            name="gpt2-encoder-json",
            url=f"{_GPT2}/encoder.json",
            filename="encoder.json",
            sha256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    )
}


def get_source(name: str) -> Source:
    """Look up a source by name; an unknown name is a KeyError listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {sorted(SOURCES)}") from None


def sources_table() -> str:
    """The sources as a Markdown table (for the README)."""
    rows = [
        "| name | URL | sha256 | archive member (sha256) | output |",
        "|---|---|---|---|---|",
    ]
    for s in SOURCES.values():
        member = f"`{s.member}` (`{s.member_sha256}`)" if s.member else "—"
        digest = f"`{s.sha256}`" if s.sha256 else "not pinned (member is)"
        rows.append(f"| {s.name} | {s.url} | {digest} | {member} | `{s.filename}` |")
    return "\n".join(rows)
