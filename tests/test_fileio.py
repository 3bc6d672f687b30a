import hashlib
import os

import pytest

from scratchgpt.plumbing.fileio import atomic_dir, atomic_path, sha256_file, write_json, write_text


def test_atomic_path_leaves_nothing_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_replaces_a_directory_as_a_whole(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_outputs_get_umask_permissions_not_temp_file_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
        with atomic_path(tmp_path / "w.bin") as tmp:  # a writer that recreates the file privately
            tmp.unlink()
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'


def test_sha256_file_hashes_across_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 41  # 10,496 bytes: several chunks of 1,000 and a short tail
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1000) == sha256_file(path) == hashlib.sha256(data).hexdigest()
