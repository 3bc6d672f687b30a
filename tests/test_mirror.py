"""`python -m scratchgpt.mirror`: building a verified mirror, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from http_server import FileServer, Route

from scratchgpt.data import mirror as mirror_module
from scratchgpt.data.download import ChecksumError, DownloadParams, download_source
from scratchgpt.data.mirror import build_mirror
from scratchgpt.data.sources import SOURCES, Source

REPO = Path(__file__).resolve().parents[1]
TEXT = b"every effort moves you\n" * 500
MEMBER = b"ham\thello\nspam\twin\n" * 300


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


ARCHIVE = zipped("inner/data.tsv", MEMBER)


@pytest.fixture
def params(tmp_path: Path) -> DownloadParams:
    return DownloadParams(
        out_dir=str(tmp_path / "raw"),
        partial_dir=str(tmp_path / "partial"),
        retries=1,
        backoff=0.001,
        max_backoff=0.01,
        chunk_size=1024,
    )


def test_mirror_holds_verified_raw_files_by_url_basename(tmp_path: Path, params: DownloadParams) -> None:
    routes = {"/files/book%20text.txt": Route(TEXT, cut_after=3000), "/zips/corpus.zip": Route(ARCHIVE)}
    with FileServer(routes) as server:
        sources = [
            Source("text", server.url("/files/book%20text.txt"), "text.txt", sha256=sha(TEXT)),
            Source(
                "zip", server.url("/zips/corpus.zip"), "data.tsv", sha256=None,
                member="inner/data.tsv", member_sha256=sha(MEMBER),
            ),
        ]  # fmt: skip
        out = tmp_path / "mirror"
        assert build_mirror(out, sources, params) == {"book text.txt": "url", "corpus.zip": "url"}
        assert sorted(p.name for p in out.iterdir()) == ["book text.txt", "corpus.zip"]  # no .partial left
        assert (out / "book text.txt").read_bytes() == TEXT  # resumed after the cut
        assert server.range_headers("/files/book%20text.txt") == [None, "bytes=3000-"]
        assert (out / "corpus.zip").read_bytes() == ARCHIVE  # the archive itself, not its member
        n_requests = len(server.requests)
        assert build_mirror(out, sources, params) == {"book text.txt": "existing", "corpus.zip": "existing"}
        assert len(server.requests) == n_requests
    # The download stage's mirror mode reads exactly this layout.
    for source in sources:
        record = download_source(source, params, mirror=out)
        assert record.source == "mirror" and record.sha256 == source.output_sha256


@pytest.mark.parametrize("bad", ["plain", "archive member"])
def test_a_file_that_fails_its_check_is_not_mirrored(tmp_path: Path, params: DownloadParams, bad: str) -> None:
    with FileServer({"/a.txt": Route(TEXT), "/b.zip": Route(ARCHIVE)}) as server:
        if bad == "plain":
            source = Source("a", server.url("/a.txt"), "a.txt", sha256=sha(b"something else"))
        else:
            source = Source("b", server.url("/b.zip"), "b.tsv", None, member="inner/data.tsv", member_sha256=sha(b"x"))
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            build_mirror(tmp_path / "mirror", [source], params)
    assert [p.name for p in (tmp_path / "mirror").rglob("*") if p.is_file()] == []


def test_a_corrupt_file_in_the_mirror_is_fetched_again(tmp_path: Path, params: DownloadParams) -> None:
    out = tmp_path / "mirror"
    out.mkdir()
    (out / "a.txt").write_bytes(b"corrupt")
    with FileServer({"/a.txt": Route(TEXT)}) as server:
        source = Source("a", server.url("/a.txt"), "a.txt", sha256=sha(TEXT))
        assert build_mirror(out, [source], params) == {"a.txt": "url"}
    assert (out / "a.txt").read_bytes() == TEXT


def test_command_mirrors_the_real_sources(tmp_path: Path, mirror_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m scratchgpt.mirror DIR` with every canonical URL served locally: the real pinned hashes."""
    routes = {f"/{s.basename}": Route((mirror_dir / s.basename).read_bytes()) for s in SOURCES.values()}
    with FileServer(routes) as server:
        local = {name: dataclasses.replace(s, url=server.url(f"/{s.basename}")) for name, s in SOURCES.items()}
        monkeypatch.setattr(mirror_module, "SOURCES", local)
        mirror_module.main([str(tmp_path / "mirror")])
    for s in SOURCES.values():
        assert (tmp_path / "mirror" / s.basename).read_bytes() == (mirror_dir / s.basename).read_bytes()
    assert sorted(p.name for p in (tmp_path / "mirror").iterdir()) == sorted(s.basename for s in SOURCES.values())


def test_command_help_and_bad_source() -> None:
    run = [sys.executable, "-m", "scratchgpt.mirror"]
    result = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: python -m scratchgpt.mirror" in result.stdout
    assert "SCRATCHGPT_MIRROR=DIR" in result.stdout
    result = subprocess.run([*run, "x", "--sources", "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


def test_suite_without_a_mirror_stops_with_one_message() -> None:
    """A missing mirror is one clear instruction, not an error per test."""
    env = {**os.environ, "SCRATCHGPT_MIRROR": "/nonexistent/mirror"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tokenizer.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert output.count("SCRATCHGPT_MIRROR=/nonexistent/mirror does not exist") == 1, output
    assert output.count("python -m scratchgpt.mirror DIR") == 1, output
    assert "passed" not in output and "error" not in output.lower(), output
