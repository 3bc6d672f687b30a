"""The instruction data as declared in params.yaml (`tokenize.instruct`): the book's JSON, or your own.

    instruct:
      path: data/external/support.jsonl       # JSON (a list of objects) or JSONL (one object per line)
      fields: {instruction: question, input: context, output: answer}   # your field names
      test_path: data/external/support-test.jsonl                         # optional: a given test split

Each record has an instruction, an optional input (a record without the input field has none) and an output:
the Alpaca fields the book uses, under the names `fields` maps them to. A missing instruction or output, an
empty one, or a value that is not a string is a `DataFileError` naming the file, the record or line and the
field, before anything is tokenized.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scratchgpt.data.inputs import check_input_path
from scratchgpt.data.records import ABSENT, DataFileError, Record, check_size, detect_format, read_records

INSTRUCTION_KEYS = ("instruction", "input", "output")
"""The Alpaca fields, in the book's order."""
FORMATS = ("auto", "json", "jsonl")
SPLIT_COLUMN = "split"
"""Tables of records from more than one file mark the given test split's rows `test` here (the others: empty)."""


@dataclass
class InstructionDataParams:
    """`tokenize.instruct`: the instruction data."""

    path: str = "data/raw/instruction-data.json"
    """The records (a file in data/raw/ or data/external/); split into train/val/test by the `sample` ratios."""
    format: str = "auto"
    """json (a list of objects) | jsonl (one object per line) | auto (from the extension: .json, .jsonl)."""
    fields: dict[str, str] = field(default_factory=lambda: {k: k for k in INSTRUCTION_KEYS})
    """Your field name for each Alpaca field (instruction, input, output); one left out keeps its Alpaca name."""
    test_path: str | None = None
    """A given test split in the same format; `path` then splits into train and validation only."""

    def __post_init__(self) -> None:
        check_input_path(self.path, "path")
        if self.test_path is not None:
            check_input_path(self.test_path, "test_path")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        for p in (self.path, self.test_path):
            if p is not None and detect_format(p, self.format) not in ("json", "jsonl"):
                raise ValueError(f"{p}: set format (json or jsonl): the extension does not say which")
        if not isinstance(self.fields, dict):
            raise ValueError(f"fields must map {list(INSTRUCTION_KEYS)} to your field names, got {self.fields!r}")
        unknown = sorted(set(self.fields) - set(INSTRUCTION_KEYS))
        if unknown:
            raise ValueError(f"fields: unknown key(s) {unknown}; the Alpaca fields are {list(INSTRUCTION_KEYS)}")
        if not all(isinstance(v, str) and v for v in self.fields.values()):
            raise ValueError(f"fields: each value must be a field name, got {self.fields!r}")
        names = self.field_names()
        if len(set(names.values())) != len(names):
            raise ValueError(f"fields: two Alpaca fields read the same field ({self.fields})")

    def field_names(self) -> dict[str, str]:
        """Alpaca field -> the field name in the files."""
        return {k: self.fields.get(k, k) for k in INSTRUCTION_KEYS}

    def files(self) -> list[str]:
        return [p for p in (self.path, self.test_path) if p is not None]


def read_instruction_records(
    path: str | os.PathLike[str], fields: Mapping[str, str] | None = None, fmt: str = "auto"
) -> list[dict[str, str]]:
    """The records of one file with the Alpaca keys (instruction, input, output), checked."""
    names = {k: (fields or {}).get(k, k) for k in INSTRUCTION_KEYS}
    fmt = detect_format(path, fmt) or "json"
    rows = read_records(path, fmt, list(names.values()), optional=[names["input"]])
    return [_record(row, names) for row in rows]


def read_instruction_data(params: InstructionDataParams, max_file_bytes: int) -> tuple[list[dict[str, str]], int]:
    """Every record, those of `test_path` last, and how many come from `path`."""
    for p in params.files():
        check_size(p, max_file_bytes)
    records = read_instruction_records(params.path, params.fields, params.format)
    if not records:
        raise DataFileError(f"{params.path}: no records")
    test = read_instruction_records(params.test_path, params.fields, params.format) if params.test_path else []
    if params.test_path and not test:
        raise DataFileError(f"{params.test_path}: no records")
    return records + test, len(records)


def _record(row: Record, names: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, name in names.items():
        value: Any = row.values[name]
        if key == "input" and value is ABSENT:
            value = ""
        if not isinstance(value, str):
            raise DataFileError(f"{row.where}: {name!r} is not a string")
        if key != "input" and not value.strip():
            raise DataFileError(f"{row.where}, field {name!r}: empty {key}")
        out[key] = value
    return out
