"""Tokenizers: the book's regex word tokenizer and GPT-2's byte-level BPE, built offline.

`SimpleTokenizer` is chapter 2's teaching tokenizer (a word-level vocabulary built from one text).
`gpt2_tokenizer` builds a `tiktoken.Encoding` identical to tiktoken's `gpt2` from the two files
OpenAI published with GPT-2 (`vocab.bpe`, `encoder.json`) lying in a local directory, after
checking their sha256 — it never fetches anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import tiktoken

from scratchgpt.data.sources import SOURCES

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"
ENDOFTEXT_ID = 50256  # GPT-2's only special token: the last id of its 50,257-token vocabulary
GPT2_VOCAB_SIZE = 50257

# The pre-tokenizer regex of tiktoken's `gpt2`/`r50k_base` encodings. It splits text exactly as
# GPT-2's original `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
# does; the possessive form is tiktoken's faster equivalent, and the Encoding must carry this exact
# string to be identical to tiktoken's.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

VOCAB_BPE = "vocab.bpe"
ENCODER_JSON = "encoder.json"
# Pinned hashes come from the single declaration of the pipeline's sources.
VOCAB_FILE_SHA256 = {
    VOCAB_BPE: SOURCES["gpt2-vocab-bpe"].output_sha256,
    ENCODER_JSON: SOURCES["gpt2-encoder-json"].output_sha256,
}


class VocabFileError(ValueError):
    """A GPT-2 vocabulary file is missing, corrupt (wrong sha256) or inconsistent with its partner."""


# --------------------------------------------------------------------------------------------
# SimpleTokenizer (book, chapter 2)

_SPLIT_RE = re.compile(r'([,.:;?_!"()\']|--|\s)')
_SPACE_BEFORE_PUNCT_RE = re.compile(r'\s+([,.:;?!"()\'])')


class SimpleTokenizer:
    """The book's word-level tokenizer: regex split, a fixed vocabulary, an `<|unk|>` fallback.

    >>> tok = SimpleTokenizer.from_text("Hello, world. Is this-- a test?")
    >>> tok.decode(tok.encode("Hello, world."))
    'Hello, world.'
    """

    def __init__(self, vocab: Mapping[str, int]) -> None:
        """Use `vocab` (token string -> id). Ids must be unique."""
        self.str_to_int: dict[str, int] = dict(vocab)
        self.int_to_str: dict[int, str] = {i: s for s, i in self.str_to_int.items()}
        if len(self.int_to_str) != len(self.str_to_int):
            raise ValueError("vocabulary maps two tokens to the same id")
        self.unk_id: int | None = self.str_to_int.get(UNK)

    @classmethod
    def from_text(cls, text: str, special_tokens: Iterable[str] = (ENDOFTEXT, UNK)) -> SimpleTokenizer:
        """Vocabulary of `text`'s sorted unique tokens, then `special_tokens` (ids continue after them)."""
        tokens = sorted(set(cls.split(text)))
        tokens += [t for t in special_tokens if t not in tokens]
        return cls({token: i for i, token in enumerate(tokens)})

    @staticmethod
    def split(text: str) -> list[str]:
        """Split into words and punctuation; whitespace separates and is dropped."""
        return [piece.strip() for piece in _SPLIT_RE.split(text) if piece.strip()]

    def __len__(self) -> int:
        return len(self.str_to_int)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a word outside the vocabulary becomes the `<|unk|>` id."""
        ids = []
        for token in self.split(text):
            token_id = self.str_to_int.get(token, self.unk_id)
            if token_id is None:
                raise KeyError(f"token {token!r} is not in the vocabulary, which has no {UNK} token")
            ids.append(token_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces, with the space before punctuation removed (the book's rule)."""
        try:
            text = " ".join(self.int_to_str[i] for i in ids)
        except KeyError as exc:
            raise KeyError(f"token id {exc.args[0]} is not in the vocabulary (size {len(self)})") from None
        return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)


# --------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE from local files


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are already printable, non-space characters keep their own code point; the other
    68 (controls, space, NBSP, soft hyphen, ...) are shifted to 256, 257, ... in byte order. The
    iteration order of the returned dict is also the order of GPT-2's ranks 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


def _unicode_to_bytes(token: str, decoder: Mapping[str, int], where: str) -> bytes:
    try:
        return bytes(decoder[ch] for ch in token)
    except KeyError as exc:
        raise VocabFileError(
            f"{where}: token {token!r} has character {exc.args[0]!r} outside GPT-2's byte map"
        ) from None


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    if not path.is_file():
        raise VocabFileError(f"{path}: GPT-2 vocabulary file not found (run the download stage)")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise VocabFileError(f"{path}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    return data


def bpe_ranks_from_files(
    vocab_bpe: str | os.PathLike[str], encoder_json: str | os.PathLike[str]
) -> dict[bytes, int]:
    """tiktoken's `mergeable_ranks` for GPT-2: byte strings -> ranks, from the two published files.

    Ranks 0..255 are the single bytes in `byte_to_unicode` order; merge line k of `vocab.bpe`
    creates the token of rank 256 + k. `encoder.json` must agree with that on every token (it is
    the same vocabulary written the other way round), so a file pair that disagrees is rejected.
    """
    vocab_bpe, encoder_json = Path(vocab_bpe), Path(encoder_json)
    bpe_text = _read_verified(vocab_bpe, VOCAB_FILE_SHA256[VOCAB_BPE]).decode("utf-8")
    encoder: dict[str, int] = json.loads(_read_verified(encoder_json, VOCAB_FILE_SHA256[ENCODER_JSON]))

    decoder = {ch: b for b, ch in byte_to_unicode().items()}
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_to_unicode())}
    lines = bpe_text.split("\n")
    if not lines[0].startswith("#version"):
        raise VocabFileError(f"{vocab_bpe}: expected a '#version' header, got {lines[0][:40]!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        left, sep, right = line.partition(" ")
        if not sep or not left or not right or " " in right:
            raise VocabFileError(f"{vocab_bpe}:{lineno}: expected a merge 'A B', got {line!r}")
        where = f"{vocab_bpe}:{lineno}"
        ranks[_unicode_to_bytes(left, decoder, where) + _unicode_to_bytes(right, decoder, where)] = len(ranks)

    expected = {
        _unicode_to_bytes(token, decoder, str(encoder_json)): rank
        for token, rank in encoder.items()
        if token != ENDOFTEXT
    }
    if expected != ranks:
        bad = next((t for t in ranks.keys() | expected.keys() if ranks.get(t) != expected.get(t)), None)
        raise VocabFileError(
            f"{vocab_bpe} and {encoder_json} disagree: token {bad!r} has rank {ranks.get(bad)} "
            f"from the merges but {expected.get(bad)} in the encoder"
        )
    if encoder.get(ENDOFTEXT) != ENDOFTEXT_ID:
        raise VocabFileError(
            f"{encoder_json}: {ENDOFTEXT} must have id {ENDOFTEXT_ID}, got {encoder.get(ENDOFTEXT)}"
        )
    return ranks


def gpt2_tokenizer(vocab_dir: str | os.PathLike[str]) -> tiktoken.Encoding:
    """GPT-2's tokenizer from `vocab_dir/vocab.bpe` and `vocab_dir/encoder.json` (sha256-checked).

    The result is identical to `tiktoken.get_encoding("gpt2")` (same ranks, split pattern and
    special token `<|endoftext|>` = 50256) but is built from local files only. Built once per
    directory and file state; later calls return the cached `Encoding`.
    """
    vocab_dir = Path(vocab_dir).resolve()
    stamps = []
    for name in (VOCAB_BPE, ENCODER_JSON):
        try:
            st = (vocab_dir / name).stat()
        except FileNotFoundError:
            raise VocabFileError(
                f"{vocab_dir / name}: GPT-2 vocabulary file not found (run the download stage)"
            ) from None
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return _build_gpt2(vocab_dir, tuple(stamps))


@functools.lru_cache(maxsize=8)
def _build_gpt2(vocab_dir: Path, _stamps: tuple) -> tiktoken.Encoding:
    # `_stamps` is only part of the cache key: a replaced or edited file gets a fresh build.
    ranks = bpe_ranks_from_files(vocab_dir / VOCAB_BPE, vocab_dir / ENCODER_JSON)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
