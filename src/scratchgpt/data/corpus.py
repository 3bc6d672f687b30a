"""Streaming encoding of a pretraining corpus into one Parquet column of GPT-2 token ids.

The corpus is a list of documents: UTF-8 text files (one document each) and the rows of a text column of
Parquet, JSONL, JSON, CSV or TSV files (`CorpusFile`; `corpus_files` expands the `tokenize.corpus` entries,
globs and directories included). Their token stream is
`enc(doc_1) + [<|endoftext|>] + enc(doc_2) + ...` — exactly what encoding the documents joined by
the text `<|endoftext|>` with that special token allowed gives (a document's own text is always
encoded as ordinary text).

Memory stays flat in the corpus size: files are read in blocks, cut into chunks at points where
GPT-2's pre-tokenizer is guaranteed to split anyway (so chunked encoding equals whole-text
encoding), encoded a batch of chunks at a time with tiktoken's threaded `encode_ordinary_batch`, and
written incrementally with a `pyarrow.parquet.ParquetWriter` while the next batches encode (a table
file's rows are read whole: `tokenize.max_file_bytes` bounds it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

from scratchgpt.data.inputs import check_input_path, expand
from scratchgpt.data.records import FORMATS, detect_format, read_records, text_value
from scratchgpt.plumbing.fileio import atomic_path
from scratchgpt.plumbing.progress import progress_bar

log = logging.getLogger(__name__)

TOKEN_COLUMN = "token"
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB of text per encode call: big enough to amortise, small for memory
DEFAULT_ROW_GROUP_TOKENS = 1 << 20
_BATCHES_IN_FLIGHT = 2
METADATA_KEY = b"scratchgpt.data.corpus"  # Parquet key-value metadata: the documents and their counts

# A safe chunk boundary: one space or newline with a non-whitespace character on both sides.
# GPT-2's pattern (see tokenizer.GPT2_PAT_STR) never puts such a character in the same piece as
# the one before it, and the piece starting there does not depend on anything before it (the
# pattern has no look-behind), so text[:p] and text[p:] encode to the halves of the whole.
# Python's \S excludes every character Unicode calls White_Space (and U+001C..U+001F besides), so
# this is at least as strict as the tokenizer's own \s.
_CUT_RE = re.compile(r"(?<=\S)[ \n](?=\S)")


class CorpusError(ValueError):
    """The corpus is empty, unreadable or not UTF-8."""


CORPUS_COLUMN = "text"
"""The text column of a table-format corpus file unless the entry names another."""


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus and how to read it: `text` (the whole file is one document) or a table format
    (`scratchgpt.data.records.FORMATS`) whose `column` holds one document per row."""

    path: Path
    format: str = "text"
    column: str | None = None


def check_corpus_entry(entry: Any, setting: str) -> None:
    """ValueError unless `entry` is a path/glob/directory, or a mapping {path, column?, format?}, inside the
    input directories (`scratchgpt.data.inputs`)."""
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"path", "column", "format"})
        if unknown or "path" not in entry:
            raise ValueError(f"{setting}: a mapping needs 'path' and may have 'column' and 'format', got {entry!r}")
        if "column" in entry and (not isinstance(entry["column"], str) or not entry["column"]):
            raise ValueError(f"{setting}: column must be a column name, got {entry['column']!r}")
        if entry.get("format", "auto") not in ("auto", "text", *FORMATS):
            raise ValueError(f"{setting}: format must be one of {['auto', 'text', *FORMATS]}, got {entry['format']!r}")
        entry = entry["path"]
    check_input_path(entry, setting)


def corpus_files(entries: Sequence[str | dict], setting: str = "tokenize.corpus") -> list[CorpusFile]:
    """The files the corpus entries name, in order (globs and directories expanded); a file's format comes from
    the entry or its extension (others are text)."""
    out = []
    for i, entry in enumerate(entries):
        spec = entry if isinstance(entry, dict) else {"path": entry}
        for path in expand(spec["path"], f"{setting}[{i}]"):
            fmt = detect_format(path, spec.get("format", "auto")) or "text"
            out.append(CorpusFile(path, fmt, None if fmt == "text" else spec.get("column", CORPUS_COLUMN)))
    return out


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids 0..n_vocab-1 (uint16 for GPT-2)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_vocab - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def iter_utf8_blocks(path: str | os.PathLike[str], block_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[str]:
    """Decode a file as strict UTF-8, `block_bytes` at a time (a character split across blocks is
    carried over). Invalid UTF-8 is a CorpusError naming the file and the byte offset."""
    offset = 0  # file offset of data[0]
    pending = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            data = pending + block if pending else block
            if not data:
                return
            try:
                text, pending = data.decode("utf-8"), b""
            except UnicodeDecodeError as exc:
                truncated_tail = block and exc.end == len(data) and exc.reason == "unexpected end of data"
                if not truncated_tail:
                    raise CorpusError(
                        f"{path}: not valid UTF-8 at byte offset {offset + exc.start} ({exc.reason})"
                    ) from None
                text, pending = data[: exc.start].decode("utf-8"), data[exc.start :]
            offset += len(data) - len(pending)
            if text:
                yield text
            if not block:
                return


def read_utf8(path: str | os.PathLike[str]) -> str:
    """A whole file as strict UTF-8; an error names the file and the byte offset."""
    return "".join(iter_utf8_blocks(path, 1 << 24))


def safe_cut(text: str) -> int:
    """The last index p > 0 where `text` may be cut with encode(text[:p]) + encode(text[p:]) ==
    encode(text) for GPT-2's tokenizer; 0 when there is none."""
    window = 4096
    while True:
        start = max(0, len(text) - window)
        last = None
        for last in _CUT_RE.finditer(text, start):  # noqa: B007 — only the last match is wanted
            pass
        if last is not None:
            return last.start()
        if start == 0:
            return 0
        window *= 8


def iter_chunks(path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[str]:
    """A file's text in chunks of about `chunk_bytes`, cut only at `safe_cut` points.

    A stretch with no safe point (e.g. one enormous word) is carried forward until one appears.
    """
    return _cut_chunks(iter_utf8_blocks(path, chunk_bytes))


def _cut_chunks(blocks: Iterable[str]) -> Iterator[str]:
    buf = ""
    for block in blocks:
        buf = buf + block if buf else block
        cut = safe_cut(buf)
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def iter_documents(source: str | os.PathLike[str] | CorpusFile, chunk_bytes: int) -> Iterator[Iterator[str]]:
    """The documents of one corpus file, each as its chunks (`iter_chunks`): a text file is one document, a
    table file one per row of its text column (an empty text is a DataFileError naming the row and column)."""
    if not isinstance(source, CorpusFile) or source.format == "text":
        yield iter_chunks(source.path if isinstance(source, CorpusFile) else source, chunk_bytes)
        return
    assert source.column is not None
    for record in read_records(source.path, source.format, [source.column]):
        text = text_value(record, source.column)
        yield _cut_chunks(text[i : i + chunk_bytes] for i in range(0, len(text), chunk_bytes))


@dataclass
class DocumentStats:
    """One corpus file: its documents (1 for a text file, its rows for a table) and their text."""

    path: str
    bytes: int = 0
    characters: int = 0
    tokens: int = 0
    documents: int = 0


@dataclass
class CorpusStats:
    """What `encode_corpus` wrote; `tokens` counts the whole stream, separators included."""

    documents: list[DocumentStats] = field(default_factory=list)
    tokens: int = 0

    @property
    def characters(self) -> int:
        return sum(d.characters for d in self.documents)

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.documents)

    def metrics(self) -> dict[str, float | int]:
        """Flat numbers for metrics/tokenize.json."""
        return {
            "documents": sum(d.documents for d in self.documents),
            "characters": self.characters,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "chars_per_token": round(self.characters / self.tokens, 4) if self.tokens else 0.0,
        }


class _TokenSink:
    """Appends token-id lists to a Parquet column in row groups of `row_group_tokens`."""

    def __init__(self, writer: pq.ParquetWriter, dtype: np.dtype, row_group_tokens: int) -> None:
        self.writer, self.dtype, self.row_group_tokens = writer, dtype, row_group_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def append(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        if self.buffered >= self.row_group_tokens:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        full = len(data) if final else len(data) - len(data) % self.row_group_tokens
        for start in range(0, full, self.row_group_tokens):
            column = pa.array(data[start : min(start + self.row_group_tokens, full)])
            self.writer.write_table(pa.table({TOKEN_COLUMN: column}))
        rest = data[full:]
        self.buffer, self.buffered = ([rest], len(rest)) if len(rest) else ([], 0)


def _batched(items: Iterable[tuple[Any, bool, str]], n: int, min_chars: int = 0) -> Iterator[list]:
    """Batches of `n` pieces, or of more until they hold `min_chars` of text (short table rows go together)."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[2])
        if len(batch) >= n and chars >= min_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_corpus(
    paths: Sequence[str | os.PathLike[str] | CorpusFile],
    enc: tiktoken.Encoding,
    out_path: str | os.PathLike[str],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_threads: int | None = None,
    row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
    compression: str = "zstd",
    progress: bool = True,
) -> CorpusStats:
    """Encode the documents of `paths` into `out_path`: a Parquet file with one column `token`.

    A text file is one document; a table file (`CorpusFile` of a table format) one per row of its text
    column. Documents are separated by `enc.eot_token`. Chunks of about `chunk_bytes` go to tiktoken's
    `encode_ordinary_batch` `num_threads` at a time, with two such calls in flight. Memory use is
    bounded by about `3 * num_threads` chunks of text and their tokens, whatever the corpus
    size. The output appears atomically; on any error nothing is left at `out_path`.
    """
    if not paths:
        raise CorpusError("empty corpus: no documents given")
    files = [p if isinstance(p, CorpusFile) else CorpusFile(Path(p)) for p in paths]
    sizes = []
    for f in files:
        if not f.path.is_file():
            raise CorpusError(f"{f.path}: corpus file not found")
        sizes.append(f.path.stat().st_size)
        if sizes[-1] == 0:
            raise CorpusError(f"{f.path}: corpus file is empty")
    threads = num_threads or os.cpu_count() or 1
    dtype = token_dtype(enc.n_vocab)
    stats = CorpusStats()
    eot = np.array([enc.eot_token], dtype=dtype)
    all_text = all(f.format == "text" for f in files)  # else file sizes are not text bytes
    bar = progress_bar(total=sum(sizes) if all_text else None, unit="B", unit_scale=True, desc="tokenize",
                       show=progress)  # fmt: skip

    def pieces() -> Iterator[tuple[DocumentStats, bool, str]]:
        for f in files:
            doc = DocumentStats(path=str(f.path))
            stats.documents.append(doc)
            for chunks in iter_documents(f, chunk_bytes):
                doc.documents += 1
                for i, text in enumerate(chunks):
                    yield doc, i == 0, text

    def write(sink: _TokenSink, group: list[tuple[DocumentStats, bool, str]], ids: list[list[int]]) -> None:
        for (doc, starts_doc, text), chunk_ids in zip(group, ids, strict=True):
            if starts_doc and stats.tokens:
                sink.append(eot)
                stats.tokens += 1
            sink.append(np.fromiter(chunk_ids, dtype=dtype, count=len(chunk_ids)))
            n_bytes = len(text.encode("utf-8"))
            doc.bytes += n_bytes
            doc.characters += len(text)
            doc.tokens += len(chunk_ids)
            stats.tokens += len(chunk_ids)
            bar.update(n_bytes)

    schema = pa.schema([(TOKEN_COLUMN, pa.from_numpy_dtype(dtype))])
    # The encoder threads are shut down (their last batch done) before the Parquet writer closes.
    with (
        bar,
        atomic_path(out_path) as tmp,
        # Dictionary encoding buys nothing on ~50k distinct ids and doubles the write cost.
        pq.ParquetWriter(tmp, schema, compression=compression, use_dictionary=False) as writer,
        ThreadPoolExecutor(_BATCHES_IN_FLIGHT, thread_name_prefix="encode") as encoders,
    ):
        sink = _TokenSink(writer, dtype, row_group_tokens)
        in_flight: deque[tuple[list, Future]] = deque()
        # Batch calls overlap: while one waits for its slowest chunk (a document's short tail),
        # the next keeps the other CPUs busy; finished batches are stored in order meanwhile.
        for group in _batched(pieces(), threads, 0 if all_text else threads * chunk_bytes // 2):
            texts = [text for _, _, text in group]
            in_flight.append((group, encoders.submit(enc.encode_ordinary_batch, texts, num_threads=threads)))
            if len(in_flight) == _BATCHES_IN_FLIGHT:
                done, future = in_flight.popleft()
                write(sink, done, future.result())
        while in_flight:
            done, future = in_flight.popleft()
            write(sink, done, future.result())
        sink.flush()
        documents = [asdict(d) for d in stats.documents]
        meta = {"eot_token": enc.eot_token, "tokens": stats.tokens, "documents": documents}
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta).encode()})
    log.info(
        "encoded %d document(s), %d characters into %d tokens -> %s",
        len(stats.documents),
        stats.characters,
        stats.tokens,
        out_path,
    )
    return stats


def read_tokens(path: str | os.PathLike[str]) -> np.ndarray:
    """The whole token stream written by `encode_corpus`, as a 1-D array of its unsigned dtype."""
    table = pq.read_table(path, columns=[TOKEN_COLUMN], memory_map=True)
    return table.column(TOKEN_COLUMN).to_numpy()


def corpus_metadata(path: str | os.PathLike[str]) -> dict:
    """The documents and counts `encode_corpus` stored in the file's metadata."""
    meta = pq.ParquetFile(path).metadata.metadata or {}
    if METADATA_KEY not in meta:
        raise CorpusError(f"{path}: not a token file written by encode_corpus (no corpus metadata)")
    return json.loads(meta[METADATA_KEY])
