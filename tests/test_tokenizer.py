"""Tokenizers: the book's SimpleTokenizer numbers and GPT-2 BPE identical to tiktoken's, offline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from scratchgpt.data import tokenizer as tk
from scratchgpt.data.tokenizer import SimpleTokenizer, VocabFileError, gpt2_tokenizer

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [
    15496,
    11,
    466,
    345,
    588,
    8887,
    30,
    220,
    50256,
    554,
    262,
    4252,
    18250,
    8812,
    2114,
    286,
    617,
    34680,
    27271,
    13,
]


@pytest.fixture(scope="module")
def mirror(mirror_dir: Path) -> Path:
    return mirror_dir


@pytest.fixture(scope="module")
def verdict(mirror: Path) -> str:
    return (mirror / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def enc(mirror: Path) -> tiktoken.Encoding:
    return gpt2_tokenizer(mirror)


# ------------------------------------------------------------------ SimpleTokenizer


def test_simple_vocab_size_matches_book(verdict: str) -> None:
    tok = SimpleTokenizer.from_text(verdict)
    assert len(SimpleTokenizer.from_text(verdict, special_tokens=())) == 1130
    assert len(tok) == 1132
    assert tok.str_to_int["<|endoftext|>"] == 1130
    assert tok.str_to_int["<|unk|>"] == 1131


def test_simple_encode_decode_book_passage(verdict: str) -> None:
    tok = SimpleTokenizer.from_text(verdict)
    text = '"It\'s the last he painted, you know,"\n       Mrs. Gisburn said with pardonable pride.'
    ids = tok.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    # The book's decode rejoins punctuation but cannot restore the space structure of quotes.
    assert (
        tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    )
    assert tok.encode(tok.decode(ids)) == ids


def test_simple_unknown_words_and_specials(verdict: str) -> None:
    tok = SimpleTokenizer.from_text(verdict)
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tok.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_simple_from_vocab_dict_and_errors() -> None:
    tok = SimpleTokenizer({"a": 0, "b": 1, ",": 2, "--": 3})
    assert tok.encode("b, a--b") == [1, 2, 0, 3, 1]
    assert tok.decode([1, 2, 0]) == "b, a"
    with pytest.raises(KeyError, match="'c' is not in the vocabulary"):
        tok.encode("c")
    with pytest.raises(KeyError, match="token id 9"):
        tok.decode([9])
    with pytest.raises(ValueError, match="same id"):
        SimpleTokenizer({"a": 0, "b": 0})


# ------------------------------------------------------------------ GPT-2 BPE


def test_gpt2_book_check(enc: tiktoken.Encoding) -> None:
    ids = enc.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"})
    assert ids == BOOK_IDS
    assert enc.decode(ids) == BOOK_TEXT
    assert enc.eot_token == 50256
    assert enc.n_vocab == 50257
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode(BOOK_TEXT)  # tiktoken's default refuses special text unless allowed


def test_gpt2_verdict_token_count(enc: tiktoken.Encoding, verdict: str) -> None:
    assert len(verdict) == 20479
    ids = enc.encode_ordinary(verdict)
    assert len(ids) == 5145
    assert ids[:5] == [40, 367, 2885, 1464, 1807]
    assert enc.decode(ids) == verdict


def test_gpt2_identical_to_tiktoken_reference(
    enc: tiktoken.Encoding, mirror: Path, monkeypatch, verdict: str
) -> None:
    # tiktoken's own loader for the `gpt2` encoding, fed the same local files, is the reference.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache writes from the reference loader
    ref_ranks = data_gym_to_mergeable_bpe_ranks(str(mirror / "vocab.bpe"), str(mirror / "encoder.json"))
    ref = tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=ref_ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
    assert enc._pat_str == r50k_pat_str
    assert enc._special_tokens == {"<|endoftext|>": 50256}
    assert enc._mergeable_ranks == ref_ranks
    samples = [verdict, "naïve café — 東京 🚀 it's  \n\n  x\t\r\n", "   ", "'s'S'LL 12345 ...!!", BOOK_TEXT]
    for text in samples:
        assert enc.encode_ordinary(text) == ref.encode_ordinary(text)


def test_gpt2_every_id_decodes_to_encoder_json_bytes(enc: tiktoken.Encoding, mirror: Path) -> None:
    # GPT-2's byte<->character map, rebuilt here independently of the library: printable,
    # non-space bytes stand for themselves, the rest are shifted to 256+n in byte order.
    char_to_byte: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            char_to_byte[chr(b)] = b
        else:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    encoder = json.loads((mirror / "encoder.json").read_text(encoding="utf-8"))
    assert len(encoder) == 50257
    id_to_token = {i: t for t, i in encoder.items()}
    assert sorted(id_to_token) == list(range(50257))
    for i in range(50256):
        expected = bytes(char_to_byte[ch] for ch in id_to_token[i])
        assert enc.decode_single_token_bytes(i) == expected, i
    assert enc.decode_single_token_bytes(50256) == b"<|endoftext|>"


def test_gpt2_is_cached_per_directory(mirror: Path, tmp_path: Path) -> None:
    assert gpt2_tokenizer(mirror) is gpt2_tokenizer(str(mirror))
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror / name, tmp_path / name)
    other = gpt2_tokenizer(tmp_path)
    assert other is not gpt2_tokenizer(mirror)
    assert other.encode_ordinary("cached?") == gpt2_tokenizer(mirror).encode_ordinary("cached?")


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_gpt2_hash_mismatch_names_file_and_hashes(mirror: Path, tmp_path: Path, name: str) -> None:
    for f in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror / f, tmp_path / f)
    corrupt = tmp_path / name
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"X")
    expected = tk.VOCAB_FILE_SHA256[name]
    with pytest.raises(VocabFileError) as info:
        gpt2_tokenizer(tmp_path)
    message = str(info.value)
    assert str(corrupt) in message and expected in message
    assert "got " in message and message.split("got ")[-1].strip() != expected


def test_gpt2_missing_file(tmp_path: Path, mirror: Path) -> None:
    shutil.copy(mirror / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(VocabFileError, match=r"encoder\.json: GPT-2 vocabulary file not found"):
        gpt2_tokenizer(tmp_path)


def test_gpt2_merges_that_disagree_with_encoder_are_rejected(
    mirror: Path, tmp_path: Path, monkeypatch
) -> None:
    lines = (mirror / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap the first two merges: their ranks no longer match
    bpe = tmp_path / "vocab.bpe"
    bpe.write_text("\n".join(lines), encoding="utf-8")
    monkeypatch.setitem(tk.VOCAB_FILE_SHA256, "vocab.bpe", hashlib.sha256(bpe.read_bytes()).hexdigest())
    with pytest.raises(VocabFileError, match="disagree"):
        tk.bpe_ranks_from_files(bpe, mirror / "encoder.json")
