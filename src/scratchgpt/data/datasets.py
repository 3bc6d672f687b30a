"""The pipeline's datasets as Parquet tables, their splits, and a torch Dataset over token windows.

Three datasets, as in the book:

* **Pretraining windows** (ch. 2/5): the corpus token stream is split into train/val at
  `train_ratio` of its tokens, then each part is cut into windows of `max_length + 1` tokens
  starting every `stride` tokens — the book's `GPTDatasetV1` sampler, stored one window per row.
  `TokenWindowDataset` reads them back memory-mapped as `(input, target)` pairs.
* **Labelled texts** (ch. 6): text, label (a class index; the names ride in the table's metadata,
  `LabelInfo`) and token ids. The book's SMS spam (ham=0, spam=1) is balanced by undersampling the
  majority class, shuffled, split 70/10/20 (`split_spam`); other data (`scratchgpt.data.labelled`) may
  have any number of classes and stratified splits.
* **Instructions** (ch. 7): Alpaca-style prompts with prompt and response token ids kept apart;
  split in file order 85/10/5 into train/test/val.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch
from torch.utils.data import Dataset

from scratchgpt.data.corpus import read_utf8, token_dtype
from scratchgpt.data.instruction_data import INSTRUCTION_KEYS, SPLIT_COLUMN, read_instruction_records
from scratchgpt.data.records import DatasetError
from scratchgpt.plumbing.fileio import atomic_dir, atomic_path
from scratchgpt.plumbing.params import check_bool, check_choice, check_int, check_ratio

WINDOW_COLUMN = "window"
# Window row groups of ~64 KiB. A random read decodes one whole group (Parquet stores a list's
# values with per-value levels, ~5 ns each, plus ~0.1 ms per read call): ~0.4 ms per random item
# on a loaded 2-core machine, ~20-30 us per item when reading in order.
ROW_GROUP_BYTES = 1 << 16
BALANCE = ("undersample", "none")
LABELS_METADATA_KEY = b"scratchgpt.labels"
"""Parquet schema metadata of a labelled table: its `LabelInfo` as JSON."""


def read_parquet(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet split as a table; DatasetError naming the file when it is truncated or not Parquet."""
    with _readable_parquet(path):
        return pq.read_table(path, columns=list(columns) if columns is not None else None)


@contextlib.contextmanager
def _readable_parquet(path: str | os.PathLike[str]) -> Iterator[None]:
    """Arrow's error on a file cut short ("Parquet magic bytes not found in footer") as a DatasetError."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        first = str(exc).split(". ")[0]
        raise DatasetError(f"{path} is truncated or corrupt (not a readable Parquet file: {first})") from exc


@dataclass
class SampleParams:
    """`sample` section of params.yaml: how the datasets are windowed, shuffled and split."""

    max_length: int = 64
    """Tokens per training input; each stored window holds max_length + 1 (input and shifted target)."""
    stride: int = 64
    """Tokens between the starts of consecutive windows (= max_length: no overlap, as in the book;
    larger than max_length skips tokens)."""
    train_ratio: float = 0.9
    """Share of the pretraining token stream (from its start) used for training; the rest validates."""
    seed: int = 123
    """Seed for the labelled texts' undersampling and shuffle."""
    cls_train_ratio: float = 0.7
    """Share of the labelled texts (of `tokenize.classification.path`) for training."""
    cls_val_ratio: float = 0.1
    """Share of the labelled texts for validation; the rest is the test split. A split given as a file is not
    drawn: the texts then go to train and the other split in proportion to their ratios."""
    balance: str = "undersample"
    """undersample: every class cut to the smallest class's size before splitting (the book, for its SMS
    data); none: every row kept (for imbalanced data, see cls.class_weights)."""
    stratify: bool = False
    """true: each class is cut at the ratios on its own, so every split has the data's class shares; false:
    the rows are shuffled together and cut (the book)."""
    instruct_train_ratio: float = 0.85
    """Share of the instruction records for training, in file order (first)."""
    instruct_test_ratio: float = 0.1
    """Share of the instruction records for testing (after train); the rest is validation. With a given test
    file the records go to train and validation in proportion to their ratios."""

    def __post_init__(self) -> None:
        for name in ("max_length", "stride"):
            check_int(self, name, 1)
        check_int(self, "seed", 0)
        ratios = ("train_ratio", "cls_train_ratio", "cls_val_ratio", "instruct_train_ratio", "instruct_test_ratio")
        for name in ratios:
            check_ratio(self, name)
        if self.cls_train_ratio + self.cls_val_ratio >= 1:
            raise ValueError("cls_train_ratio + cls_val_ratio must leave a test split (sum < 1)")
        check_choice(self, "balance", BALANCE)
        check_bool(self, "stratify")
        if self.instruct_train_ratio + self.instruct_test_ratio >= 1:
            raise ValueError("instruct_train_ratio + instruct_test_ratio must leave a validation split (sum < 1)")


def _ids_array(ids: Sequence[Sequence[int]], dtype: np.dtype) -> pa.Array:
    return pa.array(ids, type=pa.list_(pa.from_numpy_dtype(dtype)))


# --------------------------------------------------------------------------------------------
# Labelled texts, and the SMS spam collection


@dataclass(frozen=True)
class LabelInfo:
    """What a labelled table's `label` column means, kept in the table's Parquet metadata."""

    labels: tuple[str, ...]
    """The class names; label k is `labels[k]`."""
    positive_label: str | None = None
    """The class whose precision, recall and F1 the classifier's metrics report (binary data; the book: spam);
    None: macro averages and every class's own."""
    dataset: str = "cls"
    """The data's name in the metrics files: `spam` for the SMS Spam Collection, else `cls`."""
    source: str = ""
    """The file the rows came from."""
    column: str = "label"
    """Its label column."""


def with_label_info(table: pa.Table, info: LabelInfo) -> pa.Table:
    """`table` carrying `info` in its schema metadata (kept by `take`, `filter` and Parquet files)."""
    meta = dict(table.schema.metadata or {})
    meta[LABELS_METADATA_KEY] = json.dumps(dataclasses.asdict(info)).encode()
    return table.replace_schema_metadata(meta)


def read_label_info(source: pa.Table | pa.Schema | str | os.PathLike[str]) -> LabelInfo:
    """The `LabelInfo` of a labelled table, schema or Parquet file; DatasetError when it has none."""
    schema = source.schema if isinstance(source, pa.Table) else source
    if not isinstance(schema, pa.Schema):
        with _readable_parquet(source):
            schema = pq.read_schema(source)
    raw = (schema.metadata or {}).get(LABELS_METADATA_KEY)
    if raw is None:
        raise DatasetError(f"{source if not isinstance(source, pa.Table | pa.Schema) else 'table'}: no label names "
                           "in its metadata (not written by the tokenize stage)")  # fmt: skip
    data = json.loads(raw)
    return LabelInfo(**{**data, "labels": tuple(data["labels"])})


def label_dtype(n_classes: int) -> pa.DataType:
    """int8 for up to 127 classes (the book's), else a wider int."""
    return pa.int8() if n_classes <= 127 else pa.int16() if n_classes <= 32767 else pa.int32()


SPAM_LABELS = {"ham": 0, "spam": 1}
SPAM_INFO = LabelInfo(("ham", "spam"), positive_label="spam", dataset="spam")


def read_spam_collection(path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """Messages and labels of the SMS Spam Collection: one `ham|spam<TAB>text` per line.

    Lines are taken literally (no CSV quoting: some messages start with a double quote), so all
    5,574 messages survive — pandas' default `read_csv`, which the book uses, merges a few.
    """
    texts, labels = [], []
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for lineno, line in enumerate(lines, start=1):
        label, sep, text = line.rstrip("\r").partition("\t")
        if not sep:
            raise DatasetError(f"{path}:{lineno}: expected '<label>\\t<text>', got {line[:60]!r}")
        if label not in SPAM_LABELS:
            raise DatasetError(f"{path}:{lineno}: unknown label {label!r} (expected one of {sorted(SPAM_LABELS)})")
        texts.append(text)
        labels.append(SPAM_LABELS[label])
    if not texts:
        raise DatasetError(f"{path}: no messages")
    return texts, labels


def labelled_table(texts: Sequence[str], labels: Sequence[int], enc: tiktoken.Encoding, info: LabelInfo) -> pa.Table:
    """Columns `text`, `label` (the class index) and `token_ids` (GPT-2 ids), with `info` in the metadata."""
    ids = enc.encode_ordinary_batch(list(texts))
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, label_dtype(len(info.labels))),
            "token_ids": _ids_array(ids, token_dtype(enc.n_vocab)),
        }
    )
    return with_label_info(table, info)


def build_spam_table(path: str | os.PathLike[str], enc: tiktoken.Encoding) -> pa.Table:
    """Columns `text`, `label` (int8: ham 0, spam 1) and `token_ids` (GPT-2 ids), in file order."""
    texts, labels = read_spam_collection(path)
    return labelled_table(texts, labels, enc, dataclasses.replace(SPAM_INFO, source=str(path)))


def undersample(labels: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Row indices with every class cut to the smallest class's count, class by class: each larger class by
    `numpy.random.RandomState(seed).choice` without replacement (pandas' `DataFrame.sample(random_state=seed)`,
    the book's draw)."""
    keep = min(int((labels == label).sum()) for label in range(n_classes))
    parts = []
    for label in range(n_classes):
        rows = np.flatnonzero(labels == label)
        if len(rows) > keep:
            rows = rows[np.random.RandomState(seed).choice(len(rows), size=keep, replace=False)]
        parts.append(rows)
    return np.concatenate(parts)


def cut_points(n: int, train_ratio: float, val_ratio: float | None) -> tuple[int, int]:
    """Where train ends and where val ends in `n` shuffled rows: `int(n * train_ratio)`, then `int(n * val_ratio)`
    more (`val_ratio` None: validation is not drawn, so it ends where train does)."""
    train_end = int(n * train_ratio)
    return train_end, train_end + (int(n * val_ratio) if val_ratio is not None else 0)


def split_spam(table: pa.Table, *, seed: int, train_ratio: float, val_ratio: float) -> dict[str, pa.Table]:
    """Balance, shuffle and split the spam table into `train`, `val`, `test` (the book's method).

    The majority class is undersampled to the minority's count; the rows are then ham subset
    first, spam second, shuffled as a whole. Draws use `numpy.random.RandomState(seed).choice`
    without replacement — the same draws as pandas' `DataFrame.sample(random_state=seed)`, which
    the book uses. The split sizes are `int(n * train_ratio)`, `int(n * val_ratio)` and the rest.
    """
    labels = table.column("label").to_numpy()
    counts = {label: int((labels == label).sum()) for label in (0, 1)}
    if min(counts.values()) == 0:
        raise DatasetError(f"spam table has no {'ham' if counts[0] == 0 else 'spam'} rows to balance against")
    balanced = undersample(labels, 2, seed)
    shuffled = balanced[np.random.RandomState(seed).choice(len(balanced), size=len(balanced), replace=False)]
    train_end, val_end = cut_points(len(shuffled), train_ratio, val_ratio)
    n = len(shuffled)
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)}
    return {name: table.take(shuffled[a:b]) for name, (a, b) in bounds.items()}


# --------------------------------------------------------------------------------------------
# Instruction data (Alpaca format)

PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def format_prompt(record: Mapping[str, str]) -> str:
    """The Alpaca prompt up to the response: preamble, instruction, and the input when non-empty."""
    prompt = f"{PROMPT_PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record["input"]:
        prompt += f"\n\n### Input:\n{record['input']}"
    return prompt


def format_response(output: str) -> str:
    """The part after the prompt: `\\n\\n### Response:\\n{output}`."""
    return f"\n\n### Response:\n{output}"


def read_instructions(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The instruction records of the book's file: a JSON list of objects with string `instruction`, `input`,
    `output` (`scratchgpt.data.instruction_data` reads other layouts and field names)."""
    return read_instruction_records(path, fmt="json")


def split_prompt_ids(full_ids: Sequence[int], prompt_ids: Sequence[int], enc: tiktoken.Encoding, prompt: str) -> int:
    """How many of `full_ids` (the encoded prompt + response) belong to the prompt.

    Normally `prompt_ids` is a prefix of `full_ids`. If a token straddles the boundary (possible
    only when the prompt ends in whitespace) the prompt keeps the longest prefix of `full_ids`
    that decodes to a prefix of its text, and the straddling token counts as response.
    """
    n = len(prompt_ids)
    if list(full_ids[:n]) == list(prompt_ids):
        return n
    prompt_bytes = prompt.encode("utf-8")
    k = 0
    while k < len(full_ids) and prompt_bytes.startswith(enc.decode_bytes(full_ids[: k + 1])):
        k += 1
    return k


def build_instruction_table(
    source: str | os.PathLike[str] | Sequence[Mapping[str, str]], enc: tiktoken.Encoding, *, train_records: int | None = None
) -> pa.Table:
    """Columns `instruction`, `input`, `output`, `prompt`, `response`, `prompt_ids`, `response_ids`.

    `source` is the book's JSON file or the records themselves. `prompt` is `format_prompt(record)` and
    `response` is `format_response(output)`; the model reads `prompt + response`, whose encoding is exactly
    `prompt_ids + response_ids`. To train on the response only, mask the first `len(prompt_ids)` positions of
    the target. With `train_records` (records after the first that many come from a given test file), a `split`
    column marks those `test`.
    """
    records = read_instructions(source) if isinstance(source, str | os.PathLike) else list(source)
    prompts = [format_prompt(r) for r in records]
    responses = [format_response(r["output"]) for r in records]
    full = enc.encode_ordinary_batch([p + r for p, r in zip(prompts, responses, strict=True)])
    prompt_only = enc.encode_ordinary_batch(prompts)
    cuts = [split_prompt_ids(f, p, enc, text) for f, p, text in zip(full, prompt_only, prompts, strict=True)]
    dtype = token_dtype(enc.n_vocab)
    columns: dict[str, pa.Array] = {key: pa.array([r[key] for r in records], pa.string()) for key in INSTRUCTION_KEYS}
    columns["prompt"] = pa.array(prompts, pa.string())
    columns["response"] = pa.array(responses, pa.string())
    columns["prompt_ids"] = _ids_array([f[:c] for f, c in zip(full, cuts, strict=True)], dtype)
    columns["response_ids"] = _ids_array([f[c:] for f, c in zip(full, cuts, strict=True)], dtype)
    if train_records is not None and train_records < len(records):
        marks = [""] * train_records + ["test"] * (len(records) - train_records)
        columns[SPLIT_COLUMN] = pa.array(marks, pa.string())
    return pa.table(columns)


def split_instructions(table: pa.Table, *, train_ratio: float, test_ratio: float) -> dict[str, pa.Table]:
    """File-order split: first `int(n * train_ratio)` train, next `int(n * test_ratio)` test, rest val.

    With a given test split (rows marked `test` in the `split` column) the other rows split in file order into
    train and validation in proportion to their ratios: the first `int(n * train_ratio / (1 - test_ratio))`
    train.
    """
    if SPLIT_COLUMN in table.column_names:
        given = np.array(table.column(SPLIT_COLUMN).to_pylist()) == "test"
        table = table.drop_columns([SPLIT_COLUMN])
        own, test = table.filter(pa.array(~given)), table.filter(pa.array(given))
        train_end = int(own.num_rows * train_ratio / (1 - test_ratio))
        return {"train": own.slice(0, train_end), "val": own.slice(train_end), "test": test}
    n = table.num_rows
    train_end = int(n * train_ratio)
    test_end = train_end + int(n * test_ratio)
    return {
        "train": table.slice(0, train_end),
        "val": table.slice(test_end),
        "test": table.slice(train_end, test_end - train_end),
    }


def write_splits(splits: Mapping[str, pa.Table], out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write `<split>.parquet` files into `out_dir` (replaced as a whole); rows per split."""
    with atomic_dir(out_dir) as tmp:
        for name, table in splits.items():
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
    return {name: table.num_rows for name, table in splits.items()}


# --------------------------------------------------------------------------------------------
# Pretraining windows


def window_starts(n_tokens: int, max_length: int, stride: int) -> range:
    """Start offsets of the book's sliding windows: `range(0, n_tokens - max_length, stride)`."""
    return range(0, max(0, n_tokens - max_length), stride)


def write_windows(
    tokens: np.ndarray,
    out_path: str | os.PathLike[str],
    *,
    max_length: int,
    stride: int,
    rows_per_group: int | None = None,
) -> int:
    """Store the windows of `tokens` as rows of a fixed-size list column `window`; returns the count.

    Row groups hold `rows_per_group` windows (default: about `ROW_GROUP_BYTES` each), written
    uncompressed so a memory-mapped reader decodes one group cheaply.
    """
    starts = window_starts(len(tokens), max_length, stride)
    if not starts:
        raise DatasetError(
            f"{out_path}: {len(tokens)} tokens are too few for one window of max_length + 1 = {max_length + 1}"
        )
    width = max_length + 1
    if rows_per_group is None:
        rows_per_group = max(1, ROW_GROUP_BYTES // (width * tokens.dtype.itemsize))
    view = np.lib.stride_tricks.sliding_window_view(tokens, width)
    schema = pa.schema([(WINDOW_COLUMN, pa.list_(pa.from_numpy_dtype(tokens.dtype), width))])
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False) as w:
        for first in range(0, len(starts), rows_per_group):
            rows = view[starts[first : first + rows_per_group]]
            column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
            w.write_table(pa.table({WINDOW_COLUMN: column}, schema=schema))
    return len(starts)


def write_pretrain_windows(
    tokens: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    max_length: int,
    stride: int,
    train_ratio: float,
    rows_per_group: int | None = None,
) -> dict[str, int]:
    """Split `tokens` at `int(len * train_ratio)` and write `train.parquet` and `val.parquet`.

    Both parts are checked for at least one window before anything is written.
    """
    split = int(len(tokens) * train_ratio)
    parts = {"train": tokens[:split], "val": tokens[split:]}
    for name, part in parts.items():
        if not window_starts(len(part), max_length, stride):
            raise DatasetError(
                f"pretraining corpus too short: the {name} split has {len(part)} of {len(tokens)} tokens, "
                f"too few for one window of max_length + 1 = {max_length + 1} "
                "(lower sample.max_length, change sample.train_ratio, or add text to tokenize.corpus)"
            )
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        for name, part in parts.items():
            counts[f"{name}_windows"] = write_windows(
                part, tmp / f"{name}.parquet", max_length=max_length, stride=stride, rows_per_group=rows_per_group
            )
            counts[f"{name}_tokens"] = len(part)
    return counts


class TokenWindowDataset(Dataset):
    """The windows of one `write_windows` file as the book's `(input, target)` pairs.

    Item i is `(window[:-1], window[1:])` as int64 tensors of length `max_length` — what
    `GPTDatasetV1` yields for the same token stream, `max_length` and `stride`. The file is
    memory-mapped and read one row group at a time (the last few are cached), never as a whole.
    Safe to use with DataLoader workers: each process opens its own map.
    """

    def __init__(self, parquet_path: str | os.PathLike[str], cached_groups: int = 4) -> None:
        self.path = Path(parquet_path)
        self.cached_groups = cached_groups
        self._file: pq.ParquetFile | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        pf = self._parquet()
        try:
            field = pf.schema_arrow.field(WINDOW_COLUMN)
        except KeyError:
            raise DatasetError(f"{self.path}: no {WINDOW_COLUMN!r} column") from None
        if not pa.types.is_fixed_size_list(field.type):
            raise DatasetError(f"{self.path}: column {WINDOW_COLUMN!r} is {field.type}, not a fixed-size list")
        self.max_length: int = field.type.list_size - 1
        meta = pf.metadata
        self._group_ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist()

    def _parquet(self) -> pq.ParquetFile:
        if self._file is None:
            if not self.path.is_file():
                raise DatasetError(f"{self.path}: window file not found")
            with _readable_parquet(self.path):
                self._file = pq.ParquetFile(pa.memory_map(str(self.path), "r"))
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_cache"] = None, OrderedDict()
        return state

    def __len__(self) -> int:
        return self._group_ends[-1] if self._group_ends else 0

    def _group(self, g: int) -> np.ndarray:
        rows = self._cache.get(g)
        if rows is None:
            column = self._parquet().read_row_group(g, columns=[WINDOW_COLUMN]).column(0).combine_chunks()
            rows = column.flatten().to_numpy().reshape(-1, self.max_length + 1)
            self._cache[g] = rows
            if len(self._cache) > self.cached_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return rows

    def window(self, index: int) -> np.ndarray:
        """Row `index` as stored: `max_length + 1` token ids."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window {index} out of range for {n} windows in {self.path}")
        g = bisect.bisect_right(self._group_ends, index)
        first = self._group_ends[g - 1] if g else 0
        return self._group(g)[index - first]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.window(index).astype(np.int64))
        return window[:-1], window[1:]
