"""The downloader against a real HTTP server on 127.0.0.1, the offline mirror, and the DVC stage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import free_port
from http_server import FileServer, Route

from scratchgpt.data.download import (
    ChecksumError,
    DownloadError,
    DownloadParams,
    FileRecord,
    OfflineError,
    UnsafeArchiveError,
    copy_capped,
    download_all,
    download_source,
    manifest,
    metrics,
    mirror_from_env,
    unreachable_reason,
)
from scratchgpt.data.sources import SOURCES, Source
from scratchgpt.plumbing.params import ParamsError, from_dict

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"the-verdict.txt", "SMSSpamCollection", "instruction-data.json", "vocab.bpe", "encoder.json"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def mirror(mirror_dir: Path) -> Path:
    return mirror_dir


@pytest.fixture
def params(tmp_path: Path) -> DownloadParams:
    """Fast-failing params: tiny backoff and timeouts, small chunks (so cuts land mid-stream)."""
    return DownloadParams(
        out_dir=str(tmp_path / "raw"),
        partial_dir=str(tmp_path / "partial"),
        connect_timeout=2.0,
        read_timeout=2.0,
        retries=2,
        backoff=0.001,
        max_backoff=0.01,
        chunk_size=4096,
        max_member_bytes=1 << 20,
    )


def body(n: int = 100_000) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def plain(url: str, data: bytes, filename: str = "file.bin") -> Source:
    return Source(name="test", url=url, filename=filename, sha256=sha(data))


def leftovers(params: DownloadParams) -> list[str]:
    """Everything in out_dir and partial_dir (temp files included)."""
    return sorted(
        str(p.relative_to(Path(params.out_dir).parent))
        for d in (params.out_dir, params.partial_dir)
        if Path(d).exists()
        for p in Path(d).rglob("*")
    )


# ------------------------------------------------------------------------------------------- sources


def test_sources_table_is_consistent() -> None:
    assert set(SOURCES) == {"the-verdict", "sms-spam-collection", "instruction-data", "gpt2-vocab-bpe",
                            "gpt2-encoder-json"}  # fmt: skip
    assert {s.filename for s in SOURCES.values()} == OUTPUTS
    assert len({s.basename for s in SOURCES.values()}) == len(SOURCES)
    for s in SOURCES.values():
        assert s.url.startswith("https://")
        for digest in (s.sha256, s.member_sha256):
            assert digest is None or (len(digest) == 64 and int(digest, 16) >= 0)
    assert SOURCES["sms-spam-collection"].basename == "sms+spam+collection.zip"
    assert SOURCES["sms-spam-collection"].member == "SMSSpamCollection"


# ---------------------------------------------------------------------------------------------- HTTP


def test_good_file(params: DownloadParams) -> None:
    data = body()
    with FileServer({"/f.bin": Route(data)}) as server:
        record = download_source(plain(server.url("/f.bin"), data), params)
    out = Path(params.out_dir) / "file.bin"
    assert out.read_bytes() == data
    assert record == FileRecord("test", "file.bin", len(data), sha(data), "url")
    assert server.range_headers("/f.bin") == [None]
    assert leftovers(params) == ["raw/file.bin"]  # no .part, no temp files


def test_wrong_checksum_leaves_nothing(params: DownloadParams) -> None:
    data, served = body(), body()[::-1]
    with (
        FileServer({"/f.bin": Route(served)}) as server,
        pytest.raises(ChecksumError) as info,
    ):
        download_source(plain(server.url("/f.bin"), data), params)
    message = str(info.value)
    assert "/f.bin" in message and "file.bin" in message
    assert sha(data) in message and sha(served) in message
    assert not (Path(params.out_dir) / "file.bin").exists()
    assert leftovers(params) == []  # the bad .part is gone too: resuming it could never pass


def test_wrong_file_already_at_output_is_replaced(params: DownloadParams) -> None:
    data = body()
    out = Path(params.out_dir) / "file.bin"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"stale")
    with FileServer({"/f.bin": Route(data)}) as server:
        assert download_source(plain(server.url("/f.bin"), data), params).source == "url"
        assert out.read_bytes() == data
        # present with the right hash: not fetched again
        assert download_source(plain(server.url("/f.bin"), data), params).source == "existing"
        assert len(server.requests) == 1


def test_connection_cut_mid_file_resumes_with_range(params: DownloadParams) -> None:
    data, cut = body(), 30_000
    with FileServer({"/f.bin": Route(data, cut_after=cut)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    assert server.range_headers("/f.bin") == [None, f"bytes={cut}-"]
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data
    assert leftovers(params) == ["raw/file.bin"]


def test_out_of_retries_keeps_partial_for_the_next_run(params: DownloadParams) -> None:
    data, cut = body(), 30_000
    params.retries = 1
    route = Route(data, cut_after=cut, cut_times=2)  # both attempts of the first run are cut
    with FileServer({"/f.bin": route}) as server:
        with pytest.raises(DownloadError, match=r"giving up after 2 attempt\(s\).*60000 bytes kept"):
            download_source(plain(server.url("/f.bin"), data), params)
        assert not (Path(params.out_dir) / "file.bin").exists()
        assert leftovers(params) == ["partial/f.bin.part"]
        download_source(plain(server.url("/f.bin"), data), params)  # a later run finishes it
    assert server.range_headers("/f.bin") == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(params: DownloadParams) -> None:
    data = body()
    part = Path(params.partial_dir) / "f.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not survive")
    with FileServer({"/f.bin": Route(data, ranges=False)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    assert server.range_headers("/f.bin") == ["bytes=29-"]  # asked to resume, got a 200
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data


def test_cut_then_server_ignoring_range(params: DownloadParams) -> None:
    data, cut = body(), 30_000
    with FileServer({"/f.bin": Route(data, ranges=False, cut_after=cut)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    assert server.range_headers("/f.bin") == [None, f"bytes={cut}-"]
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data


@pytest.mark.parametrize("extra", [0, 10], ids=["complete", "too-long"])
def test_416_for_a_partial_at_or_past_the_end(params: DownloadParams, extra: int) -> None:
    data = body()
    part = Path(params.partial_dir) / "f.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data + b"x" * extra)
    with FileServer({"/f.bin": Route(data)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    # complete: the 416 confirms the size, nothing is re-fetched; too long: start again from zero
    expected = [f"bytes={len(data) + extra}-"] + ([None] if extra else [])
    assert server.range_headers("/f.bin") == expected
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data


def test_404_is_not_retried(params: DownloadParams) -> None:
    with (
        FileServer({}) as server,
        pytest.raises(DownloadError, match=r"/missing\.bin: not found \(HTTP 404\)"),
    ):
        download_source(plain(server.url("/missing.bin"), b"x"), params)
    assert len(server.requests) == 1
    assert leftovers(params) == []


def test_503_is_retried(params: DownloadParams) -> None:
    data = body(1000)
    with FileServer({"/f.bin": Route(data, fail_first=2)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    assert len(server.requests) == 3
    with (
        FileServer({"/f.bin": Route(data, fail_first=3)}) as server,
        pytest.raises(DownloadError, match="giving up after 3 attempt.*HTTP 503"),
    ):
        download_source(plain(server.url("/f.bin"), data, "g.bin"), params)


def test_read_timeout_is_retried(params: DownloadParams) -> None:
    data = body(1000)
    params.read_timeout = 0.2
    with FileServer({"/f.bin": Route(data, stall=1.0)}) as server:
        download_source(plain(server.url("/f.bin"), data), params)
    assert len(server.requests) == 2
    assert (Path(params.out_dir) / "file.bin").read_bytes() == data


def test_a_refused_connection_is_retried_once_then_called_offline(params: DownloadParams) -> None:
    params.retries, params.backoff, params.max_backoff = 4, 0.2, 5.0
    with FileServer({}) as server:
        url = server.url("/f.bin")  # nothing listens there any more
    started = time.monotonic()
    with pytest.raises(OfflineError, match=r"cannot connect \(connection refused\), 2 attempt\(s\)"):
        download_source(plain(url, b"x"), params)
    assert time.monotonic() - started < 1.5  # one retry after 0.2 s, not four doubling ones (3 s)


def test_what_counts_as_offline_and_what_keeps_its_backoff() -> None:
    import socket

    import requests
    import urllib3
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NameResolutionError, NewConnectionError

    conn = urllib3.connection.HTTPSConnection("raw.githubusercontent.com", 443)  # not connected

    def failed(reason: Exception, kind: type = requests.ConnectionError) -> requests.RequestException:
        return kind(MaxRetryError(None, "/f", reason))  # as requests raises them

    resolve = NameResolutionError("raw.githubusercontent.com", conn, socket.gaierror(-2, "Name or service not known"))
    assert unreachable_reason(failed(resolve)) == "host name not resolved"
    refused = NewConnectionError(conn, "Failed to establish a new connection: [Errno 111] Connection refused")
    assert unreachable_reason(failed(refused)) == "connection refused"
    proxy = urllib3.exceptions.ProxyError("Unable to connect to proxy", refused)
    assert unreachable_reason(failed(proxy, requests.exceptions.ProxyError)) == "connection refused"
    assert unreachable_reason(failed(ConnectTimeoutError(conn, "timed out"), requests.ConnectTimeout)) is None
    assert unreachable_reason(requests.ReadTimeout("read timed out")) is None
    assert unreachable_reason(requests.exceptions.ChunkedEncodingError("connection broken")) is None


# ------------------------------------------------------------------------------------------ archives


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def archive(url: str, member: str, member_data: bytes) -> Source:
    return Source(name="zip", url=url, filename="member.txt", sha256=None, member=member,
                  member_sha256=sha(member_data))  # fmt: skip


def test_zip_member_extracted(params: DownloadParams) -> None:
    member = b"ham\thello\n" * 1000
    blob = make_zip({"readme": b"about", "data/SMS": member})
    with FileServer({"/a.zip": Route(blob)}) as server:
        record = download_source(archive(server.url("/a.zip"), "data/SMS", member), params)
    assert (Path(params.out_dir) / "member.txt").read_bytes() == member
    assert record.archive == {"file": "a.zip", "bytes": len(blob), "sha256": sha(blob)}
    assert leftovers(params) == ["raw/member.txt"]  # only the member; the zip is gone


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "..\\evil.txt"])
def test_zip_slip_is_refused(params: DownloadParams, tmp_path: Path, evil: str) -> None:
    member = b"fine"
    blob = make_zip({"data.txt": member, evil: b"pwned"})
    with (
        FileServer({"/a.zip": Route(blob)}) as server,
        pytest.raises(UnsafeArchiveError, match=r"entry .*evil\.txt.* refusing the archive"),
    ):
        download_source(archive(server.url("/a.zip"), "data.txt", member), params)
    assert leftovers(params) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_zip_bomb_is_refused(params: DownloadParams) -> None:
    member = b"\0" * (params.max_member_bytes + 1)  # compresses to ~1 KiB
    blob = make_zip({"bomb.txt": member})
    assert len(blob) < 10_000
    with (
        FileServer({"/a.zip": Route(blob)}) as server,
        pytest.raises(UnsafeArchiveError, match=r"declares 1048577 bytes .* over the 1048576-byte bound"),
    ):
        download_source(archive(server.url("/a.zip"), "bomb.txt", member), params)
    assert leftovers(params) == []


def test_zip_with_lying_size_header_is_refused(params: DownloadParams) -> None:
    member = b"\0" * (params.max_member_bytes * 4)
    blob = bytearray(make_zip({"bomb.txt": member}))
    struct.pack_into("<I", blob, 22, 100)  # local header: uncompressed size
    struct.pack_into("<I", blob, blob.find(b"PK\x01\x02") + 24, 100)  # central directory: same
    with (
        FileServer({"/a.zip": Route(bytes(blob))}) as server,
        pytest.raises(DownloadError, match=r"bomb\.txt\]: cannot be extracted"),
    ):
        download_source(archive(server.url("/a.zip"), "bomb.txt", member), params)
    assert leftovers(params) == []


def test_copy_capped_stops_at_the_bound() -> None:
    """The byte cap counts what decompression yields, whatever a header declared."""
    out = io.BytesIO()
    with pytest.raises(UnsafeArchiveError, match="expands past the 1000-byte bound"):
        copy_capped(io.BytesIO(b"x" * 1001), out, limit=1000, what="m", chunk_size=64)
    assert out.tell() <= 1000
    assert copy_capped(io.BytesIO(b"x" * 1000), io.BytesIO(), limit=1000, what="m") == (sha(b"x" * 1000), 1000)


def test_zip_member_missing_or_not_a_zip(params: DownloadParams) -> None:
    with FileServer({"/a.zip": Route(make_zip({"other": b"x"})), "/b.zip": Route(b"not a zip")}) as server:
        with pytest.raises(DownloadError, match=r"no member 'data\.txt' \(entries: \['other'\]\)"):
            download_source(archive(server.url("/a.zip"), "data.txt", b"x"), params)
        with pytest.raises(DownloadError, match="not a readable zip archive"):
            download_source(archive(server.url("/b.zip"), "data.txt", b"x"), params)
    assert [p for p, _ in server.requests] == ["/a.zip", "/b.zip"]
    assert leftovers(params) == []


# -------------------------------------------------------------------------------------------- mirror


def test_mirror_all_sources_verify(params: DownloadParams, mirror: Path) -> None:
    records = download_all(params, mirror=mirror)
    out = Path(params.out_dir)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    for r in records:
        assert r.source == "mirror"
        assert hashlib.sha256((out / r.filename).read_bytes()).hexdigest() == SOURCES[r.name].output_sha256
    sms = (out / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    assert len(sms) == 5574
    m = metrics(records)
    assert m["n_files"] == 5 and m["total_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert m["origin"] == {"url": 0, "mirror": 5, "existing": 0}
    files = manifest(records)["files"]
    assert files["SMSSpamCollection"]["archive"]["file"] == "sms+spam+collection.zip"
    assert files["vocab.bpe"]["sha256"] == SOURCES["gpt2-vocab-bpe"].output_sha256
    # a second run finds everything in place
    again = download_all(params, mirror=mirror)
    assert {r.source for r in again} == {"existing"} and metrics(again)["origin"]["existing"] == 5


def test_mirror_missing_file_and_bad_copy(params: DownloadParams, mirror: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake-mirror"
    fake.mkdir()
    with pytest.raises(DownloadError, match=r"fake-mirror/the-verdict\.txt not found in the mirror"):
        download_source(SOURCES["the-verdict"], params, mirror=fake)
    (fake / "the-verdict.txt").write_text("not the verdict")
    with pytest.raises(ChecksumError, match="expected b41e41a6.*, got "):
        download_source(SOURCES["the-verdict"], params, mirror=fake)
    shutil.copyfile(mirror / "sms+spam+collection.zip", fake / "sms+spam+collection.zip")
    with zipfile.ZipFile(fake / "sms+spam+collection.zip", "a") as zf:
        zf.writestr("../escape", b"x")
    with pytest.raises(UnsafeArchiveError, match="'../escape' contains '..'"):
        download_source(SOURCES["sms-spam-collection"], params, mirror=fake)
    assert leftovers(params) == []


def test_mirror_from_env(tmp_path: Path) -> None:
    assert mirror_from_env({}) is None
    assert mirror_from_env({"SCRATCHGPT_MIRROR": ""}) is None
    assert mirror_from_env({"SCRATCHGPT_MIRROR": str(tmp_path)}) == tmp_path
    with pytest.raises(DownloadError, match="nowhere.*not a directory"):
        mirror_from_env({"SCRATCHGPT_MIRROR": str(tmp_path / "nowhere")})


# -------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sources": ["the-verdict", "nope"]}, r"unknown name\(s\) \['nope'\]"),
        ({"sources": []}, "non-empty list"),
        ({"sources": ["the-verdict", "the-verdict"]}, "duplicate"),
        ({"partial_dir": "data/raw/partial"}, "must not be inside out_dir"),
        ({"retries": -1}, "retries must be a non-negative integer"),
        ({"read_timeout": 0}, "read_timeout must be a positive number"),
        ({"max_backoff": 0.5, "backoff": 1.0}, "max_backoff"),
        ({"max_member_bytes": 1.5}, "max_member_bytes must be a positive integer"),
        ({"retry": 3}, r"unknown key\(s\) \['retry'\]"),
        ({"files": [{"url": "ftp://x/a.csv", "sha256": "0" * 64}]}, r"files\[0\]: url must be an http"),
        ({"files": [{"url": "https://x/a.csv", "sha256": "abc"}]}, "sha256 must be 64 lower-case hex digits"),
        ({"files": [{"url": "https://x/a.csv"}]}, r"files\[0\]: source 'a.csv': a plain file needs a sha256"),
        ({"files": [{"url": "https://x/a.csv", "sha256": "0" * 64, "size": 3}]}, "keys from"),
        ({"files": [{"url": "https://x/vocab.bpe", "sha256": "0" * 64}]}, "already the name of another downloaded"),
    ],
)
def test_params_are_validated(override: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        from_dict(DownloadParams, override, "download")


def test_your_files_by_url_are_fetched_verified_and_mirrored(params: DownloadParams, tmp_path: Path) -> None:
    """`download.files`: fetched into out_dir with the sources' checks, named by the URL (or `filename`), taken
    from `<mirror>/<basename of the URL>` when a mirror is set; a wrong hash leaves nothing."""
    data, other = b"id,body,queue\n1,hello,billing\n", b"a second file\n"
    with FileServer({"/d/tickets.csv": Route(data), "/x/notes.txt": Route(other)}) as server:
        files = [{"url": server.url("/d/tickets.csv"), "sha256": sha(data)},
                 {"url": server.url("/x/notes.txt"), "sha256": sha(other), "filename": "corpus-notes.txt"}]  # fmt: skip
        mine = DownloadParams(**{**params.__dict__, "sources": ["the-verdict"], "files": files})
        assert [s.filename for s in mine.user_sources()] == ["tickets.csv", "corpus-notes.txt"]
        records = [download_source(s, mine) for s in mine.user_sources()]
    assert (Path(params.out_dir) / "tickets.csv").read_bytes() == data
    assert (Path(params.out_dir) / "corpus-notes.txt").read_bytes() == other
    assert [(r.name, r.source) for r in records] == [("tickets.csv", "url"), ("corpus-notes.txt", "url")]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tickets.csv").write_bytes(data)
    shutil.rmtree(params.out_dir)
    (record,) = [download_source(s, mine, mirror=mirror) for s in mine.user_sources()[:1]]
    assert record.source == "mirror" and (Path(params.out_dir) / "tickets.csv").read_bytes() == data
    bad = DownloadParams(**{**mine.__dict__, "files": [{**files[0], "sha256": sha(b"other")}]})
    (mirror / "tickets.csv").write_bytes(data)
    shutil.rmtree(params.out_dir)
    with pytest.raises(ChecksumError):
        download_source(bad.user_sources()[0], bad, mirror=mirror)
    assert not (Path(params.out_dir) / "tickets.csv").exists()


def test_params_yaml_block_matches_defaults() -> None:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["download"]
    assert from_dict(DownloadParams, section, "download") == DownloadParams()


# --------------------------------------------------------------------------------------------- stage


def run_stage(cwd: Path, *args: str, mirror: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SCRATCHGPT_MIRROR"}
    if mirror is not None:
        env["SCRATCHGPT_MIRROR"] = str(mirror)
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "download.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_stage_help() -> None:
    proc = run_stage(REPO, "--help", mirror=None)
    assert proc.returncode == 0, proc.stderr
    assert "SCRATCHGPT_MIRROR" in proc.stdout and "sms+spam+collection.zip" in proc.stdout


def test_stage_script_with_mirror(tmp_path: Path, mirror: Path) -> None:
    section = dict(yaml.safe_load((REPO / "params.yaml").read_text())["download"], backoff=0.0, max_backoff=0.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": section}))
    proc = run_stage(tmp_path, mirror=mirror)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "data" / "raw").iterdir()} == OUTPUTS
    assert not (tmp_path / "data" / "raw.partial").exists()
    files = json.loads((tmp_path / "data" / "raw-manifest.json").read_text())["files"]
    assert set(files) == OUTPUTS and {f["source"] for f in files.values()} == {"mirror"}
    for f in files.values():
        assert f["sha256"] == SOURCES[f["name"]].output_sha256
    assert files["SMSSpamCollection"]["archive"]["file"] == "sms+spam+collection.zip"
    metrics = json.loads((tmp_path / "metrics" / "download.json").read_text())
    total = sum((tmp_path / "data" / "raw" / name).stat().st_size for name in OUTPUTS)
    assert metrics == {"n_files": 5, "total_bytes": total, "origin": {"url": 0, "mirror": 5, "existing": 0}}
    assert "from mirror" in proc.stderr

    # an empty mirror: a clear error naming the expected path, exit 1, no traceback, no new metrics
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "metrics" / "download.json").unlink()
    (tmp_path / "empty").mkdir()
    proc = run_stage(tmp_path, mirror=tmp_path / "empty")
    assert proc.returncode == 1
    assert "empty/the-verdict.txt not found in the mirror" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics").exists() or not any((tmp_path / "metrics").iterdir())
    assert not (tmp_path / "data" / "raw-manifest.json").exists()


def test_the_stage_offline_without_a_mirror_stops_after_one_retry_and_says_how_to_make_one(tmp_path: Path) -> None:
    """The issue's third case (16 s of retries on a name-resolution failure, no word of the mirror). Offline is
    made for real with a proxy that refuses connections: no request leaves 127.0.0.1."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": yaml.safe_load(
        (REPO / "params.yaml").read_text())["download"]}))  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("SCRATCHGPT_MIRROR", "NO_PROXY")}
    env.update(HTTPS_PROXY=dead, https_proxy=dead, HTTP_PROXY=dead, http_proxy=dead)
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert "the-verdict.txt: cannot connect (connection refused), 2 attempt(s). This machine looks offline" in line
    assert "set SCRATCHGPT_MIRROR=DIR" in line and "`python -m scratchgpt.mirror DIR`" in line
    assert proc.stderr.count("retry 1/1 in 1.00 s") == 1 and "retry 2/" not in proc.stderr
    assert not (tmp_path / "data" / "raw").exists() or not any((tmp_path / "data" / "raw").iterdir())


@pytest.mark.slow
def test_dvc_repro_download(tmp_path: Path, mirror: Path) -> None:
    """The real `download` stage from dvc.yaml under `dvc repro`; a second repro is a no-op."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["download"]
    for dep in stage["deps"]:
        (tmp_path / dep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / dep, tmp_path / dep)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"download": stage}}))
    section = yaml.safe_load((REPO / "params.yaml").read_text())["download"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": section}))
    env = dict(os.environ, SCRATCHGPT_MIRROR=str(mirror), DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    dvc("init", "--no-scm")
    dvc("repro", "download")
    assert {p.name for p in (tmp_path / "data" / "raw").iterdir()} == OUTPUTS
    assert "download" in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert "didn't change" in dvc("repro", "download")
    assert json.loads((tmp_path / "metrics" / "download.json").read_text())["n_files"] == 5
