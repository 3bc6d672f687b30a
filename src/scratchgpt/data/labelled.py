"""Labelled texts as declared in params.yaml (`tokenize.classification`): the book's SMS spam, or your own.

    classification:
      path: data/external/tickets.csv      # CSV, TSV, JSONL, JSON or Parquet (or the book's SMS file: format sms)
      text_column: body
      label_column: queue                  # any number (>= 2) of classes, named as the file names them
      test_path: data/external/tickets-test.csv   # optional given splits (val_path too); else drawn by ratio

`build_labelled_table` reads and checks everything before anything is tokenized: the file size bound, strict
UTF-8, the columns, no empty text or label, at least two classes, a declared `labels` list, every label of a
given validation or test file seen in `path`. Each problem is a `DataFileError` naming the file, the line or
row and the column. The table holds `text`, `label` (the class index), `token_ids` and, with given splits, a
`split` column (`val`, `test`; empty for the rows of `path`), and the class names in its metadata
(`scratchgpt.data.datasets.LabelInfo`), which travel on to the classifier's config.json.

`split_labelled` draws the splits the sample stage writes: the book's balanced shuffle (`balance:
undersample`, `stratify: false`: exactly chapter 6 for the SMS data), or every row kept, and/or each class
cut at the ratios on its own; a class with too few rows for the splits is a DatasetError naming it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import tiktoken

from scratchgpt.data.datasets import (
    SPAM_INFO,
    SPAM_LABELS,
    DatasetError,
    LabelInfo,
    cut_points,
    labelled_table,
    read_label_info,
    read_spam_collection,
    undersample,
    with_label_info,
)
from scratchgpt.data.inputs import check_input_path
from scratchgpt.data.records import FORMATS, DataFileError, check_size, detect_format, label_value, read_records, text_value

CLS_FORMATS = ("auto", "sms", *FORMATS)
SMS_FILE = "SMSSpamCollection"
"""The SMS Spam Collection's file name (it has no extension): format auto reads it as sms."""
SPLIT_COLUMN = "split"
GIVEN_SPLITS = ("val", "test")


@dataclass
class LabelledDataParams:
    """`tokenize.classification`: the labelled texts the classifier learns."""

    path: str = "data/raw/SMSSpamCollection"
    """The labelled texts (a file in data/raw/ or data/external/)."""
    format: str = "auto"
    """csv | tsv | jsonl | json | parquet | sms (the SMS Spam Collection: `ham|spam<TAB>text` lines, no header)
    | auto (from the extension; a file named SMSSpamCollection is sms)."""
    text_column: str = "text"
    """The column (JSON field) holding the text."""
    label_column: str = "label"
    """The column holding the label: a name, or an integer."""
    labels: list[str] | None = None
    """The classes in output order; a label outside the list is an error. null: the labels of `path`, sorted
    (numerically when every one is an integer)."""
    positive_label: str | None = None
    """For two classes: the one whose precision, recall and F1 the metrics report (the book: spam). null: the
    macro averages and every class's precision, recall and F1."""
    val_path: str | None = None
    """A given validation split in the same format (null: drawn from `path` by the sample ratios)."""
    test_path: str | None = None
    """A given test split in the same format (null: drawn from `path`)."""

    def __post_init__(self) -> None:
        for name in ("path", "val_path", "test_path"):
            value = getattr(self, name)
            if value is not None or name == "path":
                check_input_path(value, name)
        if self.format not in CLS_FORMATS:
            raise ValueError(f"format must be one of {list(CLS_FORMATS)}, got {self.format!r}")
        for path in self.files():
            if self.file_format(path) is None:
                raise ValueError(f"{path}: set format ({', '.join(CLS_FORMATS[1:])}): the extension does not say which")
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a column name, got {getattr(self, name)!r}")
        if self.labels is not None:
            if not isinstance(self.labels, list) or len(self.labels) < 2:
                raise ValueError(f"labels must list at least two class names, got {self.labels!r}")
            names = [str(v) for v in self.labels]
            if len(set(names)) != len(names) or not all(n.strip() for n in names):
                raise ValueError(f"labels must be distinct, non-empty names, got {self.labels!r}")
            self.labels = names
        if self.positive_label is not None:
            self.positive_label = str(self.positive_label)
            if self.labels is not None and (len(self.labels) != 2 or self.positive_label not in self.labels):
                raise ValueError(f"positive_label {self.positive_label!r} must be one of two labels {self.labels}")

    def files(self) -> list[str]:
        return [p for p in (self.path, self.val_path, self.test_path) if p is not None]

    def file_format(self, path: str) -> str | None:
        """The format `path` is read in (None: unknown)."""
        if self.format == "auto" and PurePosixPath(path).name == SMS_FILE:
            return "sms"
        return detect_format(path, self.format)

    def given(self) -> dict[str, str]:
        """The splits given as files: split -> path."""
        return {s: p for s, p in (("val", self.val_path), ("test", self.test_path)) if p is not None}


@dataclass
class _Rows:
    texts: list[str]
    labels: list[str]
    where: list[str]


def read_rows(params: LabelledDataParams, path: str) -> _Rows:
    """Texts and label names of one file, checked (empty text or label, the columns, UTF-8)."""
    fmt = params.file_format(path)
    if fmt == "sms":
        texts, ids = read_spam_collection(path)
        names = {v: k for k, v in SPAM_LABELS.items()}
        return _Rows(texts, [names[i] for i in ids], [f"{path}, line {i + 1}" for i in range(len(texts))])
    rows = _Rows([], [], [])
    assert fmt is not None  # checked with the params
    for record in read_records(path, fmt, [params.text_column, params.label_column]):
        rows.texts.append(text_value(record, params.text_column))
        rows.labels.append(label_value(record, params.label_column))
        rows.where.append(record.where)
    if not rows.texts:
        raise DataFileError(f"{path}: no rows")
    return rows


def class_names(params: LabelledDataParams, rows: _Rows) -> tuple[str, ...]:
    """The classes in output order: `params.labels`, else those of `rows` sorted; checked against `rows`."""
    column = f"column {params.label_column!r}"
    if params.labels is not None:
        allowed = set(params.labels)
        for label, where in zip(rows.labels, rows.where, strict=True):
            if label not in allowed:
                raise DataFileError(f"{where}, {column}: label {label!r} is not one of labels {params.labels}")
        absent = [name for name in params.labels if name not in set(rows.labels)]
        if absent:
            raise DataFileError(f"{params.path}, {column}: class {absent[0]!r} of labels has no rows")
        return tuple(params.labels)
    found = set(rows.labels)
    numeric = all(name.lstrip("-").isdigit() for name in found)
    names = tuple(sorted(found, key=(lambda n: (int(n), n)) if numeric else None))
    if len(names) < 2:
        raise DataFileError(f"{params.path}, {column}: one class ({', '.join(names)}); a classifier needs at least two")
    return names


def build_labelled_table(params: LabelledDataParams, enc: tiktoken.Encoding, max_file_bytes: int) -> pa.Table:
    """Every row of `path` and of the given splits, checked, tokenized, with the class names in the metadata."""
    for path in params.files():
        check_size(path, max_file_bytes)
    rows = read_rows(params, params.path)
    names = class_names(params, rows)
    if params.positive_label is not None and (len(names) != 2 or params.positive_label not in names):
        raise DataFileError(f"{params.path}, column {params.label_column!r}: positive_label "
                            f"{params.positive_label!r} must be one of two classes, found {list(names)}")  # fmt: skip
    index = {name: i for i, name in enumerate(names)}
    texts, labels, marks = list(rows.texts), [index[n] for n in rows.labels], [""] * len(rows.texts)
    for split, path in params.given().items():
        given = read_rows(params, path)
        for label, where in zip(given.labels, given.where, strict=True):
            if label not in index:
                raise DataFileError(f"{where}, column {params.label_column!r}: label {label!r} never appears in the "
                                    f"training data ({params.path}: {', '.join(names)})")  # fmt: skip
        texts += given.texts
        labels += [index[n] for n in given.labels]
        marks += [split] * len(given.texts)
    fmt = params.file_format(params.path)
    base = SPAM_INFO if fmt == "sms" else LabelInfo(names)
    info = dataclasses.replace(base, labels=names, positive_label=params.positive_label, source=params.path,
                               column=params.label_column)  # fmt: skip
    table = labelled_table(texts, labels, enc, info)
    if params.given():
        table = with_label_info(table.append_column(SPLIT_COLUMN, pa.array(marks, pa.string())), info)
    return table


def table_metrics(table: pa.Table) -> dict[str, Any]:
    """The tokenize stage's numbers for a labelled table: rows of `path` and per class, rows of the given splits,
    tokens (all). The book's
    SMS data keeps its shape (`ham`, `spam` beside `rows`); other data lists the classes under `labels`."""
    info = read_label_info(table)
    labels = table.column("label").to_numpy()
    marks = table.column(SPLIT_COLUMN).to_pylist() if SPLIT_COLUMN in table.column_names else [""] * len(labels)
    own = labels[np.array(marks) == ""]
    counts = {name: int((own == i).sum()) for i, name in enumerate(info.labels)}
    given = Counter(marks)
    out: dict[str, Any] = {"rows": given[""]}
    out.update(counts if info.dataset == "spam" else {"classes": len(info.labels), "labels": counts})
    out.update({f"{split}_rows": given[split] for split in GIVEN_SPLITS if given[split]})
    out["tokens"] = sum(len(ids) for ids in table.column("token_ids").to_pylist())
    return out


# --------------------------------------------------------------------------------------------- splits


def split_labelled(
    table: pa.Table, *, seed: int, train_ratio: float, val_ratio: float, balance: str, stratify: bool
) -> dict[str, pa.Table]:
    """train/val/test from the rows of `path` (and the given splits), as the sample params say.

    With `balance: undersample` every class is first cut to the smallest's size. Without `stratify` the rows
    are shuffled together and cut (`split_spam`'s procedure: for the book's data exactly its splits); with it,
    each class is shuffled and cut on its own and each split shuffled. A split given as a file is taken as
    it is, in file order, and the rows of `path` go to train and the drawn split in proportion to their
    ratios (0.7 and 0.1: 7/8 and 1/8). Every class must reach train and each drawn split.
    """
    info = read_label_info(table)
    labels = table.column("label").to_numpy()
    marks = np.array(table.column(SPLIT_COLUMN).to_pylist() if SPLIT_COLUMN in table.column_names else
                     [""] * len(labels))  # fmt: skip
    pool = np.flatnonzero(marks == "")
    drawn = [s for s in GIVEN_SPLITS if not (marks == s).any()]
    counts = np.bincount(labels[pool], minlength=len(info.labels))
    if balance == "undersample":
        _need_rows(info, counts, "to balance the classes (sample.balance: undersample)")
        pool = pool[undersample(labels[pool], len(info.labels), seed)]
    rng = np.random.RandomState(seed)
    groups = [pool[labels[pool] == c] for c in range(len(info.labels))] if stratify else [pool]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for rows in groups:
        rows = rows[rng.choice(len(rows), size=len(rows), replace=False)]
        for split, part in _cut(rows, train_ratio, val_ratio, drawn).items():
            parts[split].append(part)
    index = {s: np.concatenate(p) if p else np.array([], dtype=np.int64) for s, p in parts.items()}
    if stratify:
        index = {s: rows[rng.choice(len(rows), size=len(rows), replace=False)] for s, rows in index.items()}
    for split in GIVEN_SPLITS:
        if split not in drawn:
            index[split] = np.flatnonzero(marks == split)
    _check_splits(info, labels, index, ["train", *drawn], train_ratio, val_ratio)
    out = table.drop_columns([SPLIT_COLUMN]) if SPLIT_COLUMN in table.column_names else table
    return {split: out.take(index[split]) for split in ("train", "val", "test")}


def _cut(rows: np.ndarray, train_ratio: float, val_ratio: float, drawn: list[str]) -> dict[str, np.ndarray]:
    """train and the drawn splits from `rows`, in proportion to their ratios (a given split's share is left out)."""
    if drawn == ["val", "test"]:
        train_end, val_end = cut_points(len(rows), train_ratio, val_ratio)
        return {"train": rows[:train_end], "val": rows[train_end:val_end], "test": rows[val_end:]}
    if not drawn:
        return {"train": rows}
    other = val_ratio if drawn == ["val"] else 1 - train_ratio - val_ratio
    train_end, _ = cut_points(len(rows), train_ratio / (train_ratio + other), None)
    return {"train": rows[:train_end], drawn[0]: rows[train_end:]}


def _need_rows(info: LabelInfo, counts: np.ndarray, why: str) -> None:
    for name, n in zip(info.labels, counts, strict=True):
        if n == 0:
            raise DatasetError(f"{info.source}, column {info.column!r}: class {name!r} has no rows {why}")


def _check_splits(info: LabelInfo, labels: np.ndarray, index: dict[str, np.ndarray], needed: list[str],
                  train_ratio: float, val_ratio: float) -> None:  # fmt: skip
    for c, name in enumerate(info.labels):
        got = {split: int((labels[index[split]] == c).sum()) for split in ("train", "val", "test")}
        empty = [split for split in needed if got[split] == 0]
        if empty:
            raise DatasetError(
                f"{info.source}, column {info.column!r}: class {name!r} has too few rows for the splits "
                f"({', '.join(f'{got[s]} {s}' for s in needed)}; none in {' and '.join(empty)}) at "
                f"sample.cls_train_ratio {train_ratio} and cls_val_ratio {val_ratio}: add rows of it, change the "
                "ratios, or set sample.stratify: true"
            )
