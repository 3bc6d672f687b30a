"""Download the pipeline's source files, verified against pinned sha256 hashes.

Each file in `scratchgpt.data.sources.SOURCES` (and each of your own in `download.files`, pinned the same
way) comes either from its URL or, when `SCRATCHGPT_MIRROR=DIR` is set, from `DIR/<basename of its URL>`;
the checks are the same either way.

Where bytes go:
- Outputs (`out_dir/<filename>`) are written to a temporary name beside the target and renamed only
  after the sha256 matched, so the output path holds a verified file or nothing.
- An HTTP download streams into `partial_dir/<basename>.part` (default `data/raw.partial/`, outside the
  DVC output). If the connection drops, later attempts (and later runs) resume it with a `Range`
  request; a server that answers 200 instead of 206 is re-read from the start. A `.part` whose
  content fails its checksum is deleted; a complete one is moved into place.
- Archives: only the named member is extracted, streamed with a byte cap. An archive holding any entry
  with an absolute path or a `..` component (zip slip), or whose member declares or yields more than
  `max_member_bytes` (zip bomb), is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import requests

from scratchgpt.plumbing.fileio import atomic_path, sha256_file
from scratchgpt.plumbing.params import check_int, check_number, check_str
from scratchgpt.plumbing.progress import progress_bar
from scratchgpt.data.sources import SOURCES, Source

log = logging.getLogger(__name__)

MIRROR_ENV = "SCRATCHGPT_MIRROR"
# Statuses worth another try: the request may succeed later. Everything else >= 400 is final.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "scratchgpt-downloader/0.1"
# Where a file came from (`FileRecord.source`).
ORIGINS = ("url", "mirror", "existing")


class DownloadError(RuntimeError):
    """A source could not be fetched, verified or extracted."""


class ChecksumError(DownloadError):
    """A file's sha256 differs from the pinned one."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: sha256 mismatch: expected {expected}, got {actual}")
        self.what, self.expected, self.actual = what, expected, actual


class UnsafeArchiveError(DownloadError):
    """An archive tries to write outside its target (zip slip) or to expand past the size bound."""


class OfflineError(DownloadError):
    """The host cannot be reached at all (its name does not resolve, or the connection is refused or has no
    route): this machine looks offline. Retried once, not with the full backoff."""


@dataclass
class DownloadParams:
    """`download` section of params.yaml."""

    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    """Source names to fetch (keys of scratchgpt.data.sources.SOURCES); default: all of them."""
    out_dir: str = "data/raw"
    """Directory the verified files are written to (the DVC output)."""
    partial_dir: str = "data/raw.partial"
    """Where interrupted HTTP downloads wait to be resumed (`<basename>.part`); not inside out_dir."""
    connect_timeout: float = 10.0
    """Seconds to wait for a TCP connection."""
    read_timeout: float = 60.0
    """Seconds to wait for each read from an open connection."""
    retries: int = 4
    """Attempts after the first one for a failed transfer (timeouts, dropped connections, 5xx, 429)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubles on each further retry, capped at max_backoff."""
    max_backoff: float = 30.0
    """Longest wait between two attempts, in seconds."""
    chunk_size: int = 1 << 16
    """Bytes per read from the network or a file."""
    max_member_bytes: int = 64 << 20
    """Largest archive member (uncompressed bytes) we agree to extract: the zip-bomb bound."""
    files: list[dict[str, Any]] = field(default_factory=list)
    """Your own files by URL, fetched into out_dir with the same checks: each `{url, sha256}` (a zip: `{url,
    member, member_sha256}`, the member extracted), optionally `filename` (default: the URL's basename). With a
    mirror, a file comes from `<mirror>/<basename of its URL>`."""

    def __post_init__(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ValueError(f"sources must be a non-empty list of names from {list(SOURCES)}")
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources: unknown name(s) {unknown}; known: {list(SOURCES)}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: duplicate names in {self.sources}")
        for name in ("out_dir", "partial_dir"):
            check_str(self, name)
        out, part = Path(os.path.normpath(self.out_dir)), Path(os.path.normpath(self.partial_dir))
        if part == out or out in part.parents:
            raise ValueError(f"partial_dir {self.partial_dir!r} must not be inside out_dir {self.out_dir!r}")
        for name in ("connect_timeout", "read_timeout"):
            check_number(self, name, 0, exclusive=True)
        for name in ("backoff", "max_backoff"):
            check_number(self, name, 0)
        if self.max_backoff < self.backoff:
            raise ValueError(f"max_backoff ({self.max_backoff}) must be >= backoff ({self.backoff})")
        check_int(self, "retries", 0)
        for name in ("chunk_size", "max_member_bytes"):
            check_int(self, name, 1)
        self.user_sources()  # checks `files`

    def user_sources(self) -> list[Source]:
        """`files` as `Source`s (named by their file names); ValueError naming the entry if one is malformed."""
        if not isinstance(self.files, list):
            raise ValueError(f"files must be a list of {{url, sha256}} mappings, got {self.files!r}")
        taken = {SOURCES[name].filename for name in self.sources}
        out = []
        for i, entry in enumerate(self.files):
            out.append(_user_source(entry, f"files[{i}]"))
            if out[-1].filename in taken:
                raise ValueError(f"files[{i}]: {out[-1].filename!r} is already the name of another downloaded file; "
                                 "set its filename")  # fmt: skip
            taken.add(out[-1].filename)
        return out

    def all_sources(self) -> list[Source]:
        """The named sources, then `files`."""
        return [SOURCES[name] for name in self.sources] + self.user_sources()

    def http_options(self) -> dict[str, Any]:
        """The keyword arguments of `fetch_url` these params set (timeouts, retries, backoff, chunk size)."""
        names = ("connect_timeout", "read_timeout", "retries", "backoff", "max_backoff", "chunk_size")
        return {name: getattr(self, name) for name in names}


_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEYS = {"url", "sha256", "filename", "member", "member_sha256"}


def _user_source(entry: Any, where: str) -> Source:
    if not isinstance(entry, dict) or "url" not in entry or set(entry) - _FILE_KEYS:
        raise ValueError(f"{where}: expected a mapping with url and sha256 (or member and member_sha256), "
                         f"keys from {sorted(_FILE_KEYS)}; got {entry!r}")  # fmt: skip
    url = entry["url"]
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise ValueError(f"{where}: url must be an http(s) URL, got {url!r}")
    for key in ("sha256", "member_sha256"):
        if entry.get(key) is not None and not (isinstance(entry[key], str) and _SHA256.fullmatch(entry[key])):
            raise ValueError(f"{where}: {key} must be 64 lower-case hex digits, got {entry[key]!r}")
    basename = posixpath.basename(unquote(urlsplit(url).path))
    filename = entry.get("filename") or (entry.get("member") and posixpath.basename(entry["member"])) or basename
    try:
        return Source(name=str(filename), url=url, filename=str(filename), sha256=entry.get("sha256"),
                      member=entry.get("member"), member_sha256=entry.get("member_sha256"))  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class FileRecord:
    """What the stage produced for one source (one entry of the download manifest)."""

    name: str
    filename: str
    bytes: int
    sha256: str
    source: str
    """Where the file came from: "url", "mirror", or "existing" (already present with the right hash)."""
    archive: dict[str, Any] | None = None
    """For archives: the zip's file name, size and sha256."""


def mirror_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The mirror directory named by $SCRATCHGPT_MIRROR, or None when unset or empty."""
    value = (os.environ if env is None else env).get(MIRROR_ENV, "").strip()
    if not value:
        return None
    mirror = Path(value).expanduser()
    if not mirror.is_dir():
        raise DownloadError(f"{MIRROR_ENV}={value!r}: not a directory (resolved to {mirror.resolve()})")
    return mirror


# --------------------------------------------------------------------------------------------- HTTP


class _Retryable(Exception):
    """A transient failure: try again after a backoff (or after the server's Retry-After)."""

    def __init__(self, message: str, retry_after: float | None = None, *, offline: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.offline = offline


OFFLINE_RETRIES = 1
"""Retries of a host that cannot be reached at all (name resolution, connection refused, no route): one, in
case the network was just coming up; the full backoff is for timeouts, cut connections and 5xx answers."""


def unreachable_reason(exc: requests.RequestException) -> str | None:
    """Why the connection could not even be made, if that is what `exc` says ("host name not resolved",
    "connection refused", ...); None for timeouts and failures of an open connection."""
    import urllib3.exceptions as u3

    if isinstance(exc, requests.Timeout) or not isinstance(exc, requests.ConnectionError):
        return None
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason, u3.ProxyError) and len(reason.args) > 1:  # a proxy that cannot be reached
        reason = reason.args[1]
    if isinstance(reason, u3.NameResolutionError):
        return "host name not resolved"
    if isinstance(reason, u3.NewConnectionError):
        text = str(reason)
        for needle, short in (("refused", "connection refused"), ("unreachable", "network unreachable"),
                              ("No route", "no route to host")):  # fmt: skip
            if needle in text:
                return short
        return "cannot connect"
    return None


def fetch_url(
    url: str,
    part: str | os.PathLike[str],
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    chunk_size: int = 1 << 16,
    session: requests.Session | None = None,
) -> str:
    """Download `url` into the partial file `part`, resuming what is already there; return its sha256.

    Transient failures (connection errors, timeouts, a body cut short, HTTP 408/425/429/5xx) are retried
    up to `retries` times with exponential backoff. A host that cannot be reached at all (name resolution,
    connection refused: offline) is retried `OFFLINE_RETRIES` time(s), then raises OfflineError. Other HTTP
    errors (404, 403, ...) fail at once. On final failure `part` keeps the bytes received so far, for the
    next call to resume.
    """
    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    own_session = session is None
    session = session or requests.Session()
    try:
        for attempt in range(retries + 1):
            try:
                return _fetch_once(session, url, part, (connect_timeout, read_timeout), chunk_size)
            except _Retryable as exc:
                if exc.offline and attempt >= min(retries, OFFLINE_RETRIES):
                    raise OfflineError(f"{url}: cannot connect ({exc}), {attempt + 1} attempt(s)") from exc
                if attempt == retries:
                    kept = part.stat().st_size if part.exists() else 0
                    raise DownloadError(
                        f"{url}: giving up after {attempt + 1} attempt(s): {exc} "
                        f"({kept} bytes kept in {part}; the next run resumes from there)"
                    ) from exc
                delay = min(max_backoff, backoff * 2**attempt)
                if exc.retry_after is not None:
                    delay = min(max_backoff, max(delay, exc.retry_after))
                allowed = min(retries, OFFLINE_RETRIES) if exc.offline else retries
                log.warning("%s: %s; retry %d/%d in %.2f s", url, exc, attempt + 1, allowed, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        if own_session:
            session.close()


def _fetch_once(
    session: requests.Session, url: str, part: Path, timeout: tuple[float, float], chunk_size: int
) -> str:
    offset = part.stat().st_size if part.exists() else 0
    # identity: byte ranges must address the file itself, not a compressed rendering of it.
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
            status = resp.status_code
            if status == 416 and offset:
                total = _content_range_total(resp.headers.get("Content-Range"))
                if total == offset:  # the partial file already holds the whole thing
                    log.info("%s: partial download %s is complete (%d bytes)", url, part, offset)
                    return sha256_file(part)
                log.warning("%s: server rejects resuming at byte %d (size %s); restarting", url, offset, total)
                part.unlink()
                return _fetch_once(session, url, part, timeout, chunk_size)
            if status in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {status} {resp.reason}", _retry_after(resp.headers.get("Retry-After")))
            if status == 404:
                raise DownloadError(f"{url}: not found (HTTP 404)")
            if status not in (200, 206):
                raise DownloadError(f"{url}: HTTP {status} {resp.reason}")

            hasher = hashlib.sha256()
            if status == 206:
                start = _content_range_start(resp.headers.get("Content-Range"))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise _Retryable(f"asked for bytes from {offset}, server sent a range from {start}")
                log.info("%s: resuming at byte %d", url, offset)
                with part.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
                mode = "ab"
            else:
                if offset:
                    log.info("%s: server ignored the Range request; downloading from the start", url)
                offset, mode = 0, "wb"
            # Check the length ourselves: urllib3's own check drops the bytes of the read it fails on.
            resp.raw.enforce_content_length = False
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            with (
                part.open(mode) as f,
                progress_bar(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=part.name.removesuffix(".part"), show=None, leave=False,
                ) as bar,
            ):
                for chunk in resp.iter_content(chunk_size):
                    f.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise _Retryable(f"connection ended after {size} of {total} bytes")
            return hasher.hexdigest()
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        unreachable = unreachable_reason(exc)
        if unreachable is not None:
            raise _Retryable(unreachable, offline=True) from exc
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc


_RANGE_RE = re.compile(r"bytes\s+(\d+|\*)(?:-(\d+))?/(\d+|\*)")


def _content_range_start(value: str | None) -> int | None:
    m = _RANGE_RE.match(value or "")
    return int(m.group(1)) if m and m.group(1) != "*" else None


def _content_range_total(value: str | None) -> int | None:
    m = _RANGE_RE.match(value or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


# ------------------------------------------------------------------------------------------ archives


def copy_capped(
    src: BinaryIO, dst: BinaryIO, *, limit: int | None, what: str, chunk_size: int = 1 << 16
) -> tuple[str, int]:
    """Copy `src` to `dst`, hashing; raise UnsafeArchiveError once more than `limit` bytes arrive.

    Returns (sha256 hex, bytes copied). The cap is checked on the bytes actually produced, so a
    decompressor that yields more than an archive header promised is still stopped.
    """
    h, n = hashlib.sha256(), 0
    while chunk := src.read(chunk_size):
        n += len(chunk)
        if limit is not None and n > limit:
            raise UnsafeArchiveError(f"{what}: expands past the {limit}-byte bound; refusing to extract")
        h.update(chunk)
        dst.write(chunk)
    return h.hexdigest(), n


def check_member_name(archive: str | os.PathLike[str], name: str) -> None:
    """Refuse an archive entry whose name is absolute or climbs out with `..` (zip slip)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing the archive")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} contains '..'; refusing the archive")


def extract_member(
    archive: str | os.PathLike[str],
    member: str,
    dest: str | os.PathLike[str],
    *,
    expected_sha256: str,
    max_bytes: int,
    chunk_size: int = 1 << 16,
) -> tuple[str, int]:
    """Extract one `member` of zip `archive` to `dest` (atomically), verifying its sha256.

    Every entry name is checked for zip slip first, then the member's declared size, then the bytes
    actually decompressed, against `max_bytes`. Returns (sha256, size). On any failure `dest` is
    left as it was.
    """
    what = f"{archive}[{member}]"
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{archive}: not a readable zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        for info in infos:
            check_member_name(archive, info.filename)
        matches = [i for i in infos if i.filename == member]
        if not matches:
            names = [i.filename for i in infos[:20]]
            raise DownloadError(f"{archive}: no member {member!r} (entries: {names})")
        if len(matches) > 1:
            raise UnsafeArchiveError(f"{archive}: {len(matches)} entries named {member!r}; refusing the archive")
        info = matches[0]
        if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"{what}: is a directory or symlink, not a regular file")
        if info.file_size > max_bytes:
            raise UnsafeArchiveError(
                f"{what}: declares {info.file_size} bytes uncompressed, over the {max_bytes}-byte bound "
                "(download.max_member_bytes); refusing to extract"
            )
        with atomic_path(dest) as tmp:
            try:
                with zf.open(info) as src, tmp.open("wb") as out:
                    digest, size = copy_capped(src, out, limit=max_bytes, what=what, chunk_size=chunk_size)
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unsupported compression.
                raise DownloadError(f"{what}: cannot be extracted: {exc}") from exc
            if digest != expected_sha256:
                raise ChecksumError(what, expected_sha256, digest)
    return digest, size


# ------------------------------------------------------------------------------------------- sources


def download_source(source: Source, params: DownloadParams, *, mirror: Path | None = None) -> FileRecord:
    """Put the verified file for `source` at `params.out_dir/source.filename`; return its record.

    A file already there with the right hash is kept as is. Otherwise the file comes from `mirror`
    (if given) or the URL, and is checked against the pinned hash(es) before it appears.
    """
    dest = Path(params.out_dir) / source.filename
    expected = source.output_sha256
    if dest.is_file():
        actual = sha256_file(dest)
        if actual == expected:
            log.info("%s: %s already present and verified", source.name, dest)
            return FileRecord(source.name, source.filename, dest.stat().st_size, actual, "existing")
        log.warning("%s: %s has sha256 %s, expected %s; replacing it", source.name, dest, actual, expected)
        dest.unlink()

    if mirror is not None:
        raw = mirror / source.basename
        if not raw.is_file():
            raise DownloadError(
                f"{source.name}: {raw} not found in the mirror ({MIRROR_ENV}={mirror}); "
                f"expected a copy of {source.url}"
            )
        log.info("%s: copying from mirror %s", source.name, raw)
        origin, raw_sha = "mirror", None
    else:
        raw = Path(params.partial_dir) / f"{source.basename}.part"
        log.info("%s: downloading %s", source.name, source.url)
        origin = "url"
        raw_sha = fetch_url(source.url, raw, **params.http_options())

    try:
        if source.member is None:
            if origin == "mirror":
                digest, size = _copy_verified(raw, dest, expected, params.chunk_size)
            else:
                if raw_sha != expected:
                    raise ChecksumError(f"{source.url} (for {dest})", expected, raw_sha)
                with atomic_path(dest) as tmp:
                    shutil.move(raw, tmp)
                digest, size = raw_sha, dest.stat().st_size
            archive = None
        else:
            archive_sha = raw_sha or sha256_file(raw)
            if source.sha256 is not None and archive_sha != source.sha256:
                raise ChecksumError(f"{raw} (archive for {dest})", source.sha256, archive_sha)
            archive = {"file": source.basename, "bytes": raw.stat().st_size, "sha256": archive_sha}
            digest, size = extract_member(
                raw, source.member, dest,
                expected_sha256=expected, max_bytes=params.max_member_bytes, chunk_size=params.chunk_size,
            )  # fmt: skip
            if origin == "url":
                raw.unlink()
    except DownloadError:
        if origin == "url":  # bad content: resuming it could never pass the checksum
            raw.unlink(missing_ok=True)
        raise
    log.info("%s: wrote %s (%d bytes, sha256 %s, from %s)", source.name, dest, size, digest, origin)
    return FileRecord(source.name, source.filename, size, digest, origin, archive)


def _copy_verified(src: Path, dest: Path, expected: str, chunk_size: int) -> tuple[str, int]:
    with atomic_path(dest) as tmp:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            digest, size = copy_capped(fin, fout, limit=None, what=str(src), chunk_size=chunk_size)
        if digest != expected:
            raise ChecksumError(f"{src} (for {dest})", expected, digest)
    return digest, size


def download_all(params: DownloadParams, *, mirror: Path | None = None) -> list[FileRecord]:
    """Fetch every source named in `params.sources`, in order; stop at the first failure."""
    records = [download_source(source, params, mirror=mirror) for source in params.all_sources()]
    out_dir = Path(params.out_dir)
    extra = sorted(p.name for p in out_dir.iterdir() if p.name not in {r.filename for r in records})
    if extra:
        log.warning("%s holds files not produced by this stage: %s", out_dir, extra)
    partial = Path(params.partial_dir)
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return records


def manifest(records: list[FileRecord]) -> dict[str, Any]:
    """The download stage's manifest: per file its source name, bytes, sha256 and origin (and archive)."""
    files = {}
    for r in records:
        entry: dict[str, Any] = {"name": r.name, "bytes": r.bytes, "sha256": r.sha256, "source": r.source}
        if r.archive is not None:
            entry["archive"] = r.archive
        files[r.filename] = entry
    return {"files": files}


def metrics(records: list[FileRecord]) -> dict[str, Any]:
    """The content of metrics/download.json: numbers only (`dvc metrics show`), names and hashes are in
    the manifest. `origin` counts the files by where they came from (url, mirror, existing)."""
    return {
        "n_files": len(records),
        "total_bytes": sum(r.bytes for r in records),
        "origin": {origin: sum(r.source == origin for r in records) for origin in ORIGINS},
    }
