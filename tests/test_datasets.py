"""Datasets: spam and instruction tables and splits, pretraining windows and TokenWindowDataset."""

from __future__ import annotations

import csv
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
from llms_from_scratch.ch02 import GPTDatasetV1
from llms_from_scratch.ch06 import create_balanced_dataset, random_split
from llms_from_scratch.ch07 import format_input
from torch.utils.data import DataLoader

from scratchgpt.data.corpus import CorpusError
from scratchgpt.data.datasets import (
    DatasetError,
    SampleParams,
    TokenWindowDataset,
    build_instruction_table,
    build_spam_table,
    format_prompt,
    format_response,
    split_instructions,
    split_prompt_ids,
    split_spam,
    write_pretrain_windows,
    write_windows,
)
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.plumbing.params import ParamsError, from_dict


@pytest.fixture(scope="module")
def enc(mirror_dir: Path) -> tiktoken.Encoding:
    return gpt2_tokenizer(mirror_dir)


@pytest.fixture(scope="module")
def verdict_ids(enc: tiktoken.Encoding, mirror_dir: Path) -> np.ndarray:
    return np.array(enc.encode_ordinary((mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")), np.uint16)


@pytest.fixture(scope="module")
def spam_file(mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spam") / "SMSSpamCollection"
    with zipfile.ZipFile(mirror_dir / "sms+spam+collection.zip") as zf:
        path.write_bytes(zf.read("SMSSpamCollection"))
    return path


@pytest.fixture(scope="module")
def spam_table(spam_file: Path, enc: tiktoken.Encoding) -> pa.Table:
    return build_spam_table(spam_file, enc)


@pytest.fixture(scope="module")
def instruct_table(mirror_dir: Path, enc: tiktoken.Encoding) -> pa.Table:
    return build_instruction_table(mirror_dir / "instruction-data.json", enc)


# ------------------------------------------------------------------ spam


def test_spam_table(spam_table: pa.Table, spam_file: Path, enc: tiktoken.Encoding) -> None:
    assert spam_table.num_rows == 5574
    assert spam_table.schema.field("label").type == pa.int8()
    assert spam_table.schema.field("token_ids").type == pa.list_(pa.uint16())
    labels = spam_table.column("label").to_numpy()
    assert (labels == 0).sum() == 4827 and (labels == 1).sum() == 747
    first_line = spam_file.read_text(encoding="utf-8").split("\n")[0]
    label, text = first_line.split("\t")
    assert (label, spam_table.column("text")[0].as_py(), labels[0]) == ("ham", text, 0)
    for i in (0, 282, 5573):  # 282 starts with a double quote: kept literally, not CSV-unquoted
        row_text = spam_table.column("text")[i].as_py()
        assert spam_table.column("token_ids")[i].as_py() == enc.encode_ordinary(row_text)
    assert spam_table.column("text")[282].as_py().startswith('"Wen u miss someone')


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ham\tfine\nspam\tbuy\nspamm\toops\n", r"SMS:3: unknown label 'spamm'"),
        ("ham\tfine\nno tab here\n", r"SMS:2: expected '<label>\\t<text>'"),
        ("", r"SMS: no messages"),
    ],
)
def test_spam_bad_input(tmp_path: Path, enc: tiktoken.Encoding, content: str, message: str) -> None:
    path = tmp_path / "SMS"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        build_spam_table(path, enc)


def test_spam_non_utf8_names_offset(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    path = tmp_path / "SMS"
    path.write_bytes(b"ham\tok\nspam\tbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"SMS: not valid UTF-8 at byte offset 16"):
        build_spam_table(path, enc)


def test_spam_split_counts_and_balance(spam_table: pa.Table) -> None:
    splits = split_spam(spam_table, seed=123, train_ratio=0.7, val_ratio=0.1)
    assert {k: v.num_rows for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    labels = np.concatenate([s.column("label").to_numpy() for s in splits.values()])
    assert (labels == 0).sum() == (labels == 1).sum() == 747
    # Every spam message is used exactly once; the ham rows are a sample without replacement.
    rows = pa.concat_tables(splits.values()).to_pylist()
    all_rows = spam_table.to_pylist()
    assert Counter(r["text"] for r in rows if r["label"] == 1) == Counter(
        r["text"] for r in all_rows if r["label"] == 1
    )
    ham = Counter(r["text"] for r in rows if r["label"] == 0)
    assert not ham - Counter(r["text"] for r in all_rows if r["label"] == 0)
    again = split_spam(spam_table, seed=123, train_ratio=0.7, val_ratio=0.1)
    assert all(again[k].equals(splits[k]) for k in splits)
    other = split_spam(spam_table, seed=7, train_ratio=0.7, val_ratio=0.1)
    assert other["train"].column("text").to_pylist() != splits["train"].column("text").to_pylist()


def test_spam_split_is_the_books_procedure(spam_table: pa.Table, spam_file: Path) -> None:
    # The book's own functions on the same messages (read one per line, no CSV quoting).
    df = pd.read_csv(spam_file, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    assert len(df) == spam_table.num_rows
    book = random_split(create_balanced_dataset(df), 0.7, 0.1)
    ours = split_spam(spam_table, seed=123, train_ratio=0.7, val_ratio=0.1)
    for (name, table), book_df in zip(ours.items(), book, strict=True):
        assert table.column("text").to_pylist() == book_df["Text"].tolist(), name
        assert table.column("label").to_pylist() == (book_df["Label"] == "spam").astype(int).tolist(), name


# ------------------------------------------------------------------ instructions


def test_instruction_prompt_format_matches_the_book(mirror_dir: Path) -> None:
    records = json.loads((mirror_dir / "instruction-data.json").read_text(encoding="utf-8"))
    with_input = next(r for r in records if r["input"])
    without = next(r for r in records if not r["input"])
    for record in (with_input, without):
        assert format_prompt(record) == format_input(record)
    assert format_prompt({"instruction": "Add.", "input": "1 and 2", "output": "3"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2"
    )
    assert format_response("3") == "\n\n### Response:\n3"


def test_instruction_table(instruct_table: pa.Table, enc: tiktoken.Encoding, mirror_dir: Path) -> None:
    records = json.loads((mirror_dir / "instruction-data.json").read_text(encoding="utf-8"))
    assert instruct_table.num_rows == 1100
    assert instruct_table.column_names == [
        "instruction", "input", "output", "prompt", "response", "prompt_ids", "response_ids"
    ]  # fmt: skip
    assert instruct_table.schema.field("prompt_ids").type == pa.list_(pa.uint16())
    rows = instruct_table.to_pylist()
    for record, row in zip(records, rows, strict=True):
        assert {k: row[k] for k in ("instruction", "input", "output")} == record
        assert row["prompt"] == format_input(record)
        assert row["response"] == f"\n\n### Response:\n{record['output']}"
        # The model reads prompt + response: its encoding is exactly prompt_ids + response_ids.
        assert row["prompt_ids"] + row["response_ids"] == enc.encode_ordinary(row["prompt"] + row["response"])
        assert enc.decode(row["prompt_ids"]) == row["prompt"]
        assert enc.decode(row["response_ids"]) == row["response"]


def test_prompt_ending_in_whitespace_keeps_the_invariant(enc: tiktoken.Encoding) -> None:
    # "abc \n" + "\n\n###..." encodes differently at the seam than the prompt alone would.
    prompt, response = "abc \n", "\n\n### Response:\nok"
    full = enc.encode_ordinary(prompt + response)
    prompt_ids = enc.encode_ordinary(prompt)
    assert full[: len(prompt_ids)] != prompt_ids
    k = split_prompt_ids(full, prompt_ids, enc, prompt)
    assert 0 < k < len(prompt_ids)
    assert prompt.startswith(enc.decode(full[:k]))
    assert not prompt.startswith(enc.decode(full[: k + 1]))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}],
            "record 1 has no 'output'",
        ),
        (
            [{"instruction": "a", "input": "", "output": "b"}] * 3 + [{"input": "", "output": "b"}],
            "record 3 has no 'instr",
        ),
        ([{"instruction": "a", "input": None, "output": "b"}], "record 0: 'input' is not a string"),
        ([["not", "a", "dict"]], "record 0 is a list"),
        ({"instruction": "a"}, "expected a non-empty JSON list"),
    ],
)
def test_instruction_bad_records(tmp_path: Path, enc: tiktoken.Encoding, records: object, message: str) -> None:
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        build_instruction_table(path, enc)


def test_instruction_split_in_file_order(instruct_table: pa.Table) -> None:
    splits = split_instructions(instruct_table, train_ratio=0.85, test_ratio=0.1)
    assert {k: v.num_rows for k, v in splits.items()} == {"train": 935, "val": 55, "test": 110}
    instructions = instruct_table.column("instruction").to_pylist()
    assert splits["train"].column("instruction").to_pylist() == instructions[:935]
    assert splits["test"].column("instruction").to_pylist() == instructions[935:1045]
    assert splits["val"].column("instruction").to_pylist() == instructions[1045:]


# ------------------------------------------------------------------ pretraining windows


def book_pairs(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """GPTDatasetV1's sliding window, restated: inputs at i, targets at i + 1."""
    return [(ids[i : i + max_length], ids[i + 1 : i + max_length + 1]) for i in range(0, len(ids) - max_length, stride)]


def test_first_window_of_the_verdict(verdict_ids: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    assert write_windows(verdict_ids, path, max_length=4, stride=1) == 5141
    ds = TokenWindowDataset(path)
    x, y = ds[0]
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [40, 367, 2885, 1464]
    assert y.tolist() == [367, 2885, 1464, 1807]
    assert ds.max_length == 4 and len(ds) == 5141
    field = pq.read_schema(path).field("window")
    assert field.type == pa.list_(pa.uint16(), 5)


@pytest.mark.parametrize(
    ("max_length", "stride", "rows_per_group"), [(4, 1, 97), (8, 3, 10), (64, 64, 7), (256, 128, None)]
)
def test_windows_equal_the_books_pairs(
    verdict_ids: np.ndarray, tmp_path: Path, max_length: int, stride: int, rows_per_group: int | None
) -> None:
    path = tmp_path / "w.parquet"
    n = write_windows(verdict_ids, path, max_length=max_length, stride=stride, rows_per_group=rows_per_group)
    expected = book_pairs(verdict_ids.tolist(), max_length, stride)
    ds = TokenWindowDataset(path)
    assert n == len(ds) == len(expected)
    order = list(range(len(ds)))[::-1]  # backwards: every row group is read again, out of order
    assert [(ds[i][0].tolist(), ds[i][1].tolist()) for i in order] == [expected[i] for i in order]
    if rows_per_group:
        assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // rows_per_group)
        assert len(ds._cache) <= ds.cached_groups  # only a few row groups are ever held


def test_windows_equal_the_books_gptdatasetv1(enc: tiktoken.Encoding, mirror_dir: Path, tmp_path: Path) -> None:
    text = (mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")
    ids = np.array(enc.encode_ordinary(text), np.uint16)
    for max_length, stride in [(4, 1), (256, 128)]:
        book = GPTDatasetV1(text, enc, max_length=max_length, stride=stride)
        path = tmp_path / f"w{max_length}.parquet"
        write_windows(ids, path, max_length=max_length, stride=stride, rows_per_group=50)
        ours = TokenWindowDataset(path)
        assert len(ours) == len(book)
        for i in range(len(book)):
            assert all(torch.equal(a, b) for a, b in zip(ours[i], book[i], strict=True)), i


def test_dataset_indexing_and_dataloader_workers(verdict_ids: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    write_windows(verdict_ids, path, max_length=16, stride=16, rows_per_group=25)
    ds = TokenWindowDataset(path)
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    serial = [torch.cat(b) for b in DataLoader(ds, batch_size=8)]
    parallel = [torch.cat(b) for b in DataLoader(ds, batch_size=8, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_pretrain_split_and_too_short_corpus(verdict_ids: np.ndarray, tmp_path: Path) -> None:
    counts = write_pretrain_windows(verdict_ids, tmp_path / "pretrain", max_length=64, stride=64, train_ratio=0.9)
    assert counts == {"train_windows": 72, "train_tokens": 4630, "val_windows": 8, "val_tokens": 515}
    train, val = (TokenWindowDataset(tmp_path / "pretrain" / f"{s}.parquet") for s in ("train", "val"))
    assert train[0][0].tolist() == verdict_ids[:64].tolist()
    assert val[0][0].tolist() == verdict_ids[4630 : 4630 + 64].tolist()
    out = tmp_path / "short"
    with pytest.raises(DatasetError, match=r"corpus too short: the val split has 515 of 5145 tokens"):
        write_pretrain_windows(verdict_ids, out, max_length=515, stride=1, train_ratio=0.9)
    with pytest.raises(DatasetError, match=r"corpus too short: the train split has 9 of 10 tokens"):
        write_pretrain_windows(verdict_ids[:10], out, max_length=64, stride=64, train_ratio=0.9)
    assert not out.exists()


def test_dataset_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"token": pa.array([1, 2, 3], pa.uint16())}), path)
    with pytest.raises(DatasetError, match="no 'window' column"):
        TokenWindowDataset(path)
    with pytest.raises(DatasetError, match="window file not found"):
        TokenWindowDataset(tmp_path / "missing.parquet")


def test_sample_params_validation() -> None:
    p = from_dict(SampleParams, {"max_length": 32})
    assert (p.max_length, p.stride, p.train_ratio, p.seed) == (32, 64, 0.9, 123)
    for bad, message in [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"stride": 1.5}, "stride must be a positive integer"),
        ({"train_ratio": 1.0}, r"train_ratio must be a number in \(0, 1\)"),
        ({"cls_train_ratio": 0.9, "cls_val_ratio": 0.1}, "must leave a test split"),
        ({"balance": "oversample"}, "balance must be one of"),
        ({"stratify": "yes"}, "stratify must be true or false"),
        ({"instruct_train_ratio": 0.95, "instruct_test_ratio": 0.05}, "must leave a validation split"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"max_len": 4}, "unknown key"),
    ]:
        with pytest.raises(ParamsError, match=message):
            from_dict(SampleParams, bad, "sample")
