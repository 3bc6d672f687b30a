"""Streaming corpus encoding: chunked == whole-text encoding, UTF-8 errors with offsets, flat memory."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken

from scratchgpt.data import corpus
from scratchgpt.data.corpus import (
    CorpusError,
    corpus_metadata,
    encode_corpus,
    iter_chunks,
    iter_utf8_blocks,
    read_tokens,
    safe_cut,
    token_dtype,
)
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.pipeline.tokenize import TokenizeParams
from scratchgpt.plumbing.params import ParamsError, from_dict

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def enc(mirror_dir: Path) -> tiktoken.Encoding:
    return gpt2_tokenizer(mirror_dir)


@pytest.fixture(scope="module")
def documents(mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real documents: the-verdict, the instruction JSON, and the SMS collection text."""
    out = tmp_path_factory.mktemp("docs")
    with zipfile.ZipFile(mirror_dir / "sms+spam+collection.zip") as zf:
        (out / "SMSSpamCollection").write_bytes(zf.read("SMSSpamCollection"))
    return [mirror_dir / "the-verdict.txt", mirror_dir / "instruction-data.json", out / "SMSSpamCollection"]


def whole_text_ids(enc: tiktoken.Encoding, paths: list[Path]) -> list[int]:
    """The reference: all documents joined by the special-token text, encoded in one call."""
    text = EOT.join(p.read_text(encoding="utf-8") for p in paths)
    return enc.encode(text, allowed_special={EOT})


# ------------------------------------------------------------------ chunking


def test_safe_cut_points_never_change_the_encoding(enc: tiktoken.Encoding) -> None:
    # Fuzz: text from an alphabet rich in the pre-tokenizer's edge cases (whitespace runs, Unicode
    # spaces, contractions, digits, punctuation, non-Latin letters). Every candidate cut point must
    # split the encoding exactly.
    alphabet = [" ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\x1c", "'s", "'ll", "'", "a",
                "bc", "Word", "7", "42", ".", "!?", "--", "é", "東京", "🚀", "<|", "|>"]  # fmt: skip
    rng = random.Random(0)
    cuts_checked = 0
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        whole = enc.encode_ordinary(text)
        for match in corpus._CUT_RE.finditer(text):
            p = match.start()
            assert enc.encode_ordinary(text[:p]) + enc.encode_ordinary(text[p:]) == whole, (text, p)
            cuts_checked += 1
    assert cuts_checked > 1000


def test_an_unsafe_cut_would_change_the_encoding(enc: tiktoken.Encoding) -> None:
    # Why the cut rule matters: cutting inside a word, or after a whitespace run that the
    # pre-tokenizer would have split differently, changes the tokens.
    text = "one two\n\nthree"
    whole = enc.encode_ordinary(text)
    assert enc.encode_ordinary("one tw") + enc.encode_ordinary("o\n\nthree") != whole
    assert enc.encode_ordinary("one two\n\n") + enc.encode_ordinary("three") != whole  # "\n\n" merges
    assert safe_cut(text) == 3  # the only safe point: the space between "one" and "two"
    text = "one  two\n\nthree"
    assert safe_cut(text) == 0
    assert safe_cut("a b\nc  d") == 3  # the newline between "b" and "c"; not inside "  "
    assert safe_cut("nospaceatall") == 0


def test_iter_chunks_are_small_and_rejoin(documents: list[Path]) -> None:
    text = documents[0].read_text(encoding="utf-8")
    chunks = list(iter_chunks(documents[0], chunk_bytes=256))
    assert "".join(chunks) == text
    assert len(chunks) > 50
    assert max(len(c) for c in chunks) < 2 * 256 + 64


@pytest.mark.parametrize("chunk_bytes", [257, 1 << 20])
def test_chunked_encoding_equals_whole_text_encoding(
    enc: tiktoken.Encoding, documents: list[Path], tmp_path: Path, chunk_bytes: int
) -> None:
    out = tmp_path / "tokens.parquet"
    stats = encode_corpus(documents, enc, out, chunk_bytes=chunk_bytes, num_threads=2, progress=False)
    expected = whole_text_ids(enc, documents)
    tokens = read_tokens(out)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert (tokens == enc.eot_token).sum() == 2  # one separator between each pair of documents
    assert stats.tokens == len(expected)
    assert [d.tokens for d in stats.documents] == [len(enc.encode_ordinary(p.read_text())) for p in documents]


@pytest.mark.parametrize("chunk_bytes", [5, 16])
def test_tiny_chunks_equal_whole_text_encoding(
    enc: tiktoken.Encoding, documents: list[Path], tmp_path: Path, chunk_bytes: int
) -> None:
    # Chunks of a few bytes put a cut (or a carried-over stretch) at nearly every space and newline.
    heads = []
    for i, doc in enumerate(documents):
        head = tmp_path / f"head{i}.txt"
        head.write_text(doc.read_text(encoding="utf-8")[:6000], encoding="utf-8")
        heads.append(head)
    out = tmp_path / "tokens.parquet"
    encode_corpus(heads, enc, out, chunk_bytes=chunk_bytes, num_threads=2, progress=False)
    assert read_tokens(out).tolist() == whole_text_ids(enc, heads)


def test_output_does_not_depend_on_chunks_or_threads(
    enc: tiktoken.Encoding, documents: list[Path], tmp_path: Path
) -> None:
    # chunk_bytes and num_threads are performance knobs, not DVC params: the file must be identical.
    outputs = []
    for chunk_bytes, threads in [(1 << 20, 1), (300, 2), (4097, 3)]:
        out = tmp_path / f"t{chunk_bytes}.parquet"
        encode_corpus(
            documents, enc, out, chunk_bytes=chunk_bytes, num_threads=threads, row_group_tokens=10_000, progress=False
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_single_document_is_the_books_token_stream(enc: tiktoken.Encoding, mirror_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "verdict.parquet"
    stats = encode_corpus([mirror_dir / "the-verdict.txt"], enc, out, progress=False)
    assert stats.metrics() == {
        "documents": 1,
        "characters": 20479,
        "bytes": 20479,
        "tokens": 5145,
        "chars_per_token": round(20479 / 5145, 4),
    }
    assert read_tokens(out)[:5].tolist() == [40, 367, 2885, 1464, 1807]
    meta = corpus_metadata(out)
    assert meta["tokens"] == 5145 and meta["eot_token"] == 50256
    assert meta["documents"][0]["path"] == str(mirror_dir / "the-verdict.txt")


def test_writes_row_groups_incrementally_with_bounded_chunks(
    enc: tiktoken.Encoding, documents: list[Path], tmp_path: Path
) -> None:
    # A spy around the real encoder records what each batch call receives: the corpus must reach
    # tiktoken in small chunks (never a whole file), and the tokens must land in many row groups.
    class Spy:
        def __init__(self, inner: tiktoken.Encoding) -> None:
            self.inner, self.calls = inner, []
            self.n_vocab, self.eot_token = inner.n_vocab, inner.eot_token

        def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
            self.calls.append([len(t) for t in texts])
            return self.inner.encode_ordinary_batch(texts, num_threads=num_threads)

    spy = Spy(enc)
    out = tmp_path / "t.parquet"
    stats = encode_corpus(documents, spy, out, chunk_bytes=8192, num_threads=2, row_group_tokens=4096, progress=False)
    assert len(spy.calls) > 20
    assert all(len(batch) <= 2 for batch in spy.calls)  # num_threads chunks per call
    assert max(max(batch) for batch in spy.calls) < 2 * 8192
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == -(-stats.tokens // 4096)
    assert all(meta.row_group(g).num_rows == 4096 for g in range(meta.num_row_groups - 1))


# ------------------------------------------------------------------ UTF-8 and bad input


def test_utf8_characters_split_across_blocks(tmp_path: Path) -> None:
    text = "naïve café — 東京 🚀 done"
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    for block in (1, 2, 3, 5):
        assert "".join(iter_utf8_blocks(path, block)) == text


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"hello \xffworld", 6),  # an impossible byte
        (b"abc" * 100 + b"\xe6\x9d", 300),  # a character cut off at the end of the file
        (b"x" * 1000 + b"\xc3\x28", 1000),  # a bad continuation byte, well past the first block
    ],
)
def test_non_utf8_names_file_and_byte_offset(enc: tiktoken.Encoding, tmp_path: Path, data: bytes, offset: int) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(data)
    with pytest.raises(CorpusError, match=rf"{bad}: not valid UTF-8 at byte offset {offset}\b"):
        list(iter_utf8_blocks(bad, 64))
    good = tmp_path / "good.txt"
    good.write_text("fine text " * 50, encoding="utf-8")
    out = tmp_path / "out" / "tokens.parquet"
    with pytest.raises(CorpusError, match=rf"bad.txt: not valid UTF-8 at byte offset {offset}\b"):
        encode_corpus([good, bad], enc, out, chunk_bytes=64, progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary file left behind either


def test_empty_corpus_is_an_error(enc: tiktoken.Encoding, tmp_path: Path) -> None:
    out = tmp_path / "tokens.parquet"
    with pytest.raises(CorpusError, match="empty corpus"):
        encode_corpus([], enc, out, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match=rf"{empty}: corpus file is empty"):
        encode_corpus([empty], enc, out, progress=False)
    with pytest.raises(CorpusError, match="missing.txt: corpus file not found"):
        encode_corpus([tmp_path / "missing.txt"], enc, out, progress=False)
    assert not out.exists()


def test_token_dtype_is_the_smallest_unsigned_type() -> None:
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_tokenize_params_validation() -> None:
    assert from_dict(TokenizeParams, {}).corpus == ["data/raw/the-verdict.txt"]
    with pytest.raises(ParamsError, match="corpus is empty"):
        from_dict(TokenizeParams, {"corpus": []}, "tokenize")
    with pytest.raises(ParamsError, match="list of files, directories or globs"):
        from_dict(TokenizeParams, {"corpus": "data/raw/the-verdict.txt"}, "tokenize")
    with pytest.raises(ParamsError, match="chunk_bytes"):
        from_dict(TokenizeParams, {"chunk_bytes": 0}, "tokenize")
    with pytest.raises(ParamsError, match="num_threads"):
        from_dict(TokenizeParams, {"num_threads": -1}, "tokenize")
    with pytest.raises(ParamsError, match="unknown key"):
        from_dict(TokenizeParams, {"corpuss": ["x"]}, "tokenize")
    with pytest.raises(ParamsError, match="outside data/raw/ and data/external/, where DVC would not see it"):
        from_dict(TokenizeParams, {"corpus": ["/home/me/book.txt"]}, "tokenize")
    with pytest.raises(ParamsError, match="outside"):
        from_dict(TokenizeParams, {"corpus": ["data/external/../../x.txt"]}, "tokenize")
    with pytest.raises(ParamsError, match="a mapping needs 'path'"):
        from_dict(TokenizeParams, {"corpus": [{"column": "text"}]}, "tokenize")
