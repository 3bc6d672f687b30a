"""`TQDM_DISABLE` silences every progress bar of the project (scratchgpt.plumbing.progress)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tiktoken

from scratchgpt.data.corpus import encode_corpus
from scratchgpt.plumbing.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("env", "show", "disable"),
    [(None, True, False), (None, False, True), (None, None, None), ("1", True, True), ("1", None, True)],
)
def test_progress_bar_honours_show_and_tqdm_disable(monkeypatch, env, show, disable):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    with progress_bar(total=1, show=show) as bar:
        assert bar.disable is (disable if disable is not None else not sys.stderr.isatty())


@pytest.mark.parametrize("env", [None, "1"])
def test_tokenize_progress_bar_is_silenced_by_tqdm_disable(tmp_path, monkeypatch, capsys, env):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    byte_level = tiktoken.Encoding(
        name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )  # fmt: skip
    (tmp_path / "doc.txt").write_text("every effort moves you\n" * 50)
    encode_corpus([tmp_path / "doc.txt"], byte_level, tmp_path / "tokens.parquet", progress=True)
    assert ("tokenize:" in capsys.readouterr().err) is (env is None)


def test_every_progress_bar_goes_through_progress_bar():
    """A direct `tqdm(...)` call would let an explicit `disable=` override TQDM_DISABLE again."""
    calls = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("src", "stages", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "progress.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\btqdm\(", line)
    ]
    assert calls == []
