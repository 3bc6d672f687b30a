"""Records from a user's data file (CSV, TSV, JSONL, JSON or Parquet), each with where it came from.

    for record in read_records("data/external/tickets.csv", "csv", ["text", "label"]):
        record.where   # "data/external/tickets.csv, line 7"
        record.values  # {"text": "...", "label": "billing"}

Every problem is a `DataFileError` whose message names the file, the line (text formats, counted from 1)
or the row/record (Parquet rows and JSON list items, counted from 0), and the column or field:
- text must be strict UTF-8 (an error gives the line and the byte offset);
- a CSV/TSV file needs a header row naming its columns, and each line the header's number of fields;
- a JSONL line must be one JSON object; a JSON file one list of objects;
- a required column (field) must be present in the header (Parquet schema) or in every record.

CSV and TSV follow Python's `csv` module (fields may be double-quoted, as spreadsheet programs and pandas
write them); a leading byte-order mark is dropped. Values come back as the file holds them (strings, and in
JSON or Parquet also numbers, booleans, None); `text_value` and `label_value` check them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
"""The table formats `read_records` reads."""
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip
"""The format `detect_format` gives each file name extension."""
PARQUET_BATCH_ROWS = 65_536
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()
"""The value of an optional column (field) that a record does not have (JSON null is None)."""


class DatasetError(ValueError):
    """Input data that cannot become a dataset: malformed records, unknown labels, too little data.

    (Defined here, the lowest data module, so that `DataFileError` can be one; `scratchgpt.data.datasets`
    exports it too.)"""


class DataFileError(DatasetError):
    """A data file that cannot be read as declared (the message names the file, the row or line and the column)."""


@dataclass(frozen=True)
class Record:
    """One row of a data file: where it is, and the values of the requested columns (`ABSENT`: optional, absent)."""

    where: str
    values: dict[str, Any]


def detect_format(path: str | os.PathLike[str], declared: str = "auto") -> str | None:
    """`declared` unless it is "auto"; else the format of the file's extension (None when it has no known one)."""
    if declared != "auto":
        return declared
    return EXTENSIONS.get(Path(path).suffix.lower())


def check_size(path: str | os.PathLike[str], max_bytes: int, setting: str = "tokenize.max_file_bytes") -> int:
    """The file's size; DataFileError when it is missing, or larger than `max_bytes` (naming the `setting`)."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"{p}: file not found")
    size = p.stat().st_size
    if size > max_bytes:
        raise DataFileError(f"{p}: {size:,} bytes, over the {max_bytes:,}-byte bound ({setting}); "
                            "raise the bound or split the file")  # fmt: skip
    return size


def decode_utf8(data: bytes, path: str | os.PathLike[str]) -> str:
    """`data` (the bytes of `path`) as strict UTF-8 without a leading byte-order mark; invalid bytes are a
    DataFileError naming the line and the byte offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(f"{path}, line {line}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None
    return text.removeprefix("\ufeff")


def read_text(path: str | os.PathLike[str]) -> str:
    """A whole file as strict UTF-8 (`decode_utf8`)."""
    return decode_utf8(Path(path).read_bytes(), path)


def read_records(
    path: str | os.PathLike[str], fmt: str, columns: Sequence[str], *, optional: Sequence[str] = ()
) -> Iterator[Record]:
    """The records of `path` in file order, holding the `columns` (those in `optional` may be absent: `ABSENT`)."""
    readers = {"csv": _csv_records, "tsv": _csv_records, "jsonl": _jsonl_records, "json": _json_records,
               "parquet": _parquet_records}  # fmt: skip
    if fmt not in readers:
        raise DataFileError(f"{path}: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    return readers[fmt](Path(path), fmt, list(columns), set(optional))


def text_value(record: Record, column: str, what: str = "text") -> str:
    """The column's value as a non-empty string; DataFileError naming the record and the column otherwise."""
    value = record.values[column]
    if value is None or value is ABSENT or (isinstance(value, str) and not value.strip()):
        raise DataFileError(f"{record.where}, column {column!r}: empty {what}")
    if not isinstance(value, str):
        raise DataFileError(f"{record.where}, column {column!r}: {what} is a {type(value).__name__}, not a string")
    return value


def label_value(record: Record, column: str) -> str:
    """The column's value as a label name: a non-empty string, or an integer (as its decimal string)."""
    value = record.values[column]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_value(record, column, "label").strip()


# ------------------------------------------------------------------------------------------- readers


def _csv_records(path: Path, fmt: str, columns: list[str], optional: set[str]) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        raise DataFileError(f"{path}: empty file (expected a header row naming the columns)") from None
    except csv.Error as exc:
        raise DataFileError(f"{path}, line 1: not valid {fmt.upper()} ({exc})") from None
    index = _header_index(path, header, columns, optional)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFileError(f"{path}, line {reader.line_num}: not valid {fmt.upper()} ({exc})") from None
        if not row:
            continue  # a blank line
        where = f"{path}, line {reader.line_num}"
        if len(row) != len(header):
            raise DataFileError(f"{where}: {len(row)} field(s), the header has {len(header)}")
        yield Record(where, {c: (row[i] if i is not None else ABSENT) for c, i in index.items()})


def _header_index(path: Path, header: list[str], columns: list[str], optional: set[str]) -> dict[str, int | None]:
    names = [h.strip() for h in header]
    missing = [c for c in columns if c not in names and c not in optional]
    if missing:
        raise DataFileError(f"{path}, line 1 (header): no column {missing[0]!r} (columns: {', '.join(names)})")
    return {c: (names.index(c) if c in names else None) for c in columns}


def _jsonl_records(path: Path, fmt: str, columns: list[str], optional: set[str]) -> Iterator[Record]:
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{where}: not valid JSON ({exc.msg} at character {exc.colno})") from None
        yield _object_record(where, obj, columns, optional)


def _json_records(path: Path, fmt: str, columns: list[str], optional: set[str]) -> Iterator[Record]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list) or not data:
        raise DataFileError(f"{path}: expected a non-empty JSON list of records")
    for index, obj in enumerate(data):
        yield _object_record(f"{path}: record {index}", obj, columns, optional)


def _object_record(where: str, obj: Any, columns: list[str], optional: set[str]) -> Record:
    if not isinstance(obj, dict):
        raise DataFileError(f"{where} is a {type(obj).__name__}, not an object")
    for c in columns:
        if c not in obj and c not in optional:
            raise DataFileError(f"{where} has no {c!r} key")
    return Record(where, {c: obj.get(c, ABSENT) for c in columns})


def _parquet_records(path: Path, fmt: str, columns: list[str], optional: set[str]) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names and c not in optional]
    if missing:
        raise DataFileError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    present = [c for c in columns if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present):
        data = {c: batch.column(c).to_pylist() for c in present}
        for i in range(batch.num_rows):
            yield Record(f"{path}, row {row}", {c: (data[c][i] if c in data else ABSENT) for c in columns})
            row += 1
