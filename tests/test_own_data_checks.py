"""Your own data in the data stages, in process: the formats, columns and splits params.yaml declares, and bad
data refused by the stage before any work with one line naming the file, the row or line and the column, and
nothing written (the whole pipeline under DVC: tests/test_own_data.py)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import yaml
from helpers import load_stage

from scratchgpt.data.corpus import CorpusFile, corpus_files, encode_corpus, read_tokens
from scratchgpt.data.datasets import LabelInfo, labelled_table, read_label_info, split_spam
from scratchgpt.data.labelled import split_labelled
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.pipeline.tokenize import TokenizeParams
from scratchgpt.plumbing.params import ParamsError, from_dict

REPO = Path(__file__).resolve().parents[1]
HEADER = "id,body,queue\n"
ROWS = "".join(f"{i},text number {i} about {q},{q}\n" for i, q in enumerate(["billing", "login", "shipping"] * 10))
SUPPORT = [{"question": "Name a color.", "answer": "Red."}, {"question": "Add 2 and 2.", "context": "", "answer": "4"}]


@pytest.fixture(scope="module")
def enc(mirror_dir: Path) -> tiktoken.Encoding:
    return gpt2_tokenizer(mirror_dir)


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like cwd: the download stage's files, params.yaml naming a labelled CSV and a JSONL instruction
    set in data/external/ (both valid: each test breaks one thing)."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("the-verdict.txt", "vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, raw / name)
    ext = tmp_path / "data" / "external"
    ext.mkdir()
    (ext / "tickets.csv").write_text(HEADER + ROWS, encoding="utf-8")
    (ext / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SUPPORT * 10), encoding="utf-8")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, tokenize={
        "classification": {"path": "data/external/tickets.csv", "format": "auto", "text_column": "body",
                           "label_column": "queue", "positive_label": None},
        "instruct": {"path": "data/external/support.jsonl",
                     "fields": {"instruction": "question", "input": "context", "output": "answer"}}},
               sample={"balance": "none", "stratify": True})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(work: Path, **sections: dict) -> None:
    path = work / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[name].get(key), dict):
                params[name][key].update(value)
            else:
                params[name][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def fails(stage: str, caplog: pytest.LogCaptureFixture) -> str:
    """The one error line of a stage that must fail."""
    caplog.clear()
    with pytest.raises(SystemExit) as exit_info:
        load_stage(stage).main([])
    assert exit_info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def nothing_written(work: Path) -> bool:
    return not (work / "metrics").exists() and sorted(p.name for p in (work / "data").iterdir()) == ["external", "raw"]


def test_your_data_through_tokenize_and_sample(workdir: Path) -> None:
    load_stage("tokenize_data").main([])
    metrics = json.loads((workdir / "metrics" / "tokenize.json").read_text())
    assert metrics["cls"] == {"rows": 30, "classes": 3, "labels": {"billing": 10, "login": 10, "shipping": 10},
                              "tokens": metrics["cls"]["tokens"]}  # fmt: skip
    assert metrics["instruct"]["records"] == 20
    table = pq.read_table(workdir / "data" / "interim" / "instruct.parquet")
    assert table.column("input").to_pylist()[:2] == ["", ""] and table.column("output").to_pylist()[:2] == ["Red.", "4"]
    load_stage("sample_to_parquet").main([])
    sample = json.loads((workdir / "metrics" / "sample.json").read_text())
    assert sample["cls"] == {"train": 21, "val": 3, "test": 6}  # each class: 7 / 1 / 2
    test = pq.read_table(workdir / "data" / "processed" / "cls" / "test.parquet")
    assert Counter(test.column("label").to_pylist()) == {0: 2, 1: 2, 2: 2}
    assert read_label_info(test).labels == ("billing", "login", "shipping")


@pytest.mark.parametrize(
    ("break_it", "stage", "message"),
    [
        pytest.param(lambda w: _write(w, "tickets.csv", "id,body,label\n1,hello,billing\n"), "tokenize_data",
                     "data/external/tickets.csv, line 1 (header): no column 'queue' (columns: id, body, label)",
                     id="missing column"),
        pytest.param(lambda w: _write(w, "tickets.csv", HEADER + ROWS + '31,"  ",login\n'), "tokenize_data",
                     "data/external/tickets.csv, line 32, column 'body': empty text", id="empty text"),
        pytest.param(lambda w: _write(w, "tickets.csv", HEADER + "0,fine,billing\n1,no label here,\n" + ROWS),
                     "tokenize_data", "data/external/tickets.csv, line 3, column 'queue': empty label",
                     id="empty label"),
        pytest.param(lambda w: _write(w, "tickets.csv", HEADER + ROWS + "30,only one,refunds\n"), "sample_to_parquet",
                     "data/external/tickets.csv, column 'queue': class 'refunds' has too few rows for the splits "
                     "(0 train, 0 val, 1 test; none in train and val)", id="class with too few rows"),
        pytest.param(lambda w: _write(w, "support.jsonl", json.dumps(SUPPORT[0]) + '\n{"question": "x", "answer"\n'),
                     "tokenize_data", "data/external/support.jsonl, line 2: not valid JSON", id="malformed JSONL line"),
        pytest.param(lambda w: (w / "data/external/tickets.csv").write_bytes((HEADER + ROWS).encode()
                                                                             + b"30,caf\xe9,billing\n"),
                     "tokenize_data", "data/external/tickets.csv, line 32: not valid UTF-8 at byte offset",
                     id="invalid UTF-8"),
        pytest.param(lambda w: (_write(w, "test.csv", HEADER + "0,a billing text,billing\n1,what is this,refunds\n"),
                                set_params(w, tokenize={"classification": {"test_path": "data/external/test.csv"}})),
                     "tokenize_data", "data/external/test.csv, line 3, column 'queue': label 'refunds' never appears "
                     "in the training data (data/external/tickets.csv: billing, login, shipping)",
                     id="test label unseen in training"),
        pytest.param(lambda w: (_write(w, "small.txt", "A short corpus."),
                                set_params(w, tokenize={"max_file_bytes": 500, "corpus": ["data/external/small.txt"]})),
                     "tokenize_data", f"data/external/tickets.csv: {len(HEADER + ROWS):,} bytes, over the 500-byte "
                     "bound (tokenize.max_file_bytes)", id="file over the size bound"),
        pytest.param(lambda w: _write(w, "support.jsonl", json.dumps(SUPPORT[0]) + '\n{"question": "no answer"}\n'),
                     "tokenize_data", "data/external/support.jsonl, line 2 has no 'answer' key",
                     id="instruction without output"),
        pytest.param(lambda w: _write(w, "support.jsonl", json.dumps({"question": "q", "answer": " "}) + "\n"),
                     "tokenize_data", "data/external/support.jsonl, line 1, field 'answer': empty output",
                     id="instruction with an empty output"),
    ],
)  # fmt: skip
def test_bad_data_fails_before_any_work(workdir: Path, caplog, break_it, stage: str, message: str) -> None:
    break_it(workdir)
    if stage == "sample_to_parquet":  # the splits are the sample stage's: it refuses them, writing nothing
        load_stage("tokenize_data").main([])
        assert message in fails(stage, caplog)
        assert not (workdir / "data" / "processed").exists() and not (workdir / "metrics" / "sample.json").exists()
        return
    assert message in fails(stage, caplog)
    assert nothing_written(workdir)


def _write(work: Path, name: str, text: str) -> None:
    (work / "data" / "external" / name).write_text(text, encoding="utf-8")


def test_params_refuse_what_dvc_would_not_see_and_malformed_declarations() -> None:
    def tokenize(**values):
        return from_dict(TokenizeParams, values, "tokenize")

    for bad, message in [
        ({"classification": {"path": "/home/me/tickets.csv"}}, "outside data/raw/ and data/external/"),
        ({"classification": {"path": "data/external/tickets"}}, "set format"),
        ({"classification": {"path": "data/external/t.csv", "labels": ["only"]}}, "at least two class names"),
        ({"classification": {"path": "data/external/t.csv", "labels": ["a", "b", "c"], "positive_label": "a"}},
         "must be one of two labels"),
        ({"instruct": {"path": "data/external/s.jsonl", "fields": {"answer": "output"}}}, "unknown key"),
        ({"instruct": {"path": "data/external/s.jsonl", "fields": {"input": "q", "instruction": "q"}}},
         "read the same field"),
        ({"instruct": {"path": "../s.jsonl"}}, "outside"),
        ({"corpus": [{"path": "data/external/x.csv", "format": "xml"}]}, "format must be one of"),
        ({"max_file_bytes": 0}, "max_file_bytes must be a positive integer"),
    ]:  # fmt: skip
        with pytest.raises(ParamsError, match=message):
            tokenize(**bad)


# ------------------------------------------------------------------------------------ formats and splits


def test_jsonl_and_parquet_labels_integers_sorted_as_numbers_declared_order(workdir: Path) -> None:
    rows = [{"t": f"text {i}", "y": y} for i, y in enumerate([10, 2, 1] * 8)]
    (workdir / "data/external/labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), workdir / "data/external/labels.parquet")
    for name in ("labels.jsonl", "labels.parquet"):
        set_params(workdir, tokenize={"classification": {"path": f"data/external/{name}", "text_column": "t",
                                                         "label_column": "y", "labels": None}})  # fmt: skip
        load_stage("tokenize_data").main([])
        assert read_label_info(workdir / "data" / "interim" / "cls.parquet").labels == ("1", "2", "10")
    set_params(workdir, tokenize={"classification": {"labels": [10, 1, 2]}})
    load_stage("tokenize_data").main([])
    table = pq.read_table(workdir / "data" / "interim" / "cls.parquet")
    assert read_label_info(table).labels == ("10", "1", "2") and table.column("label").to_pylist()[:3] == [0, 2, 1]


def _table(enc: tiktoken.Encoding, labels: list[int], names: tuple[str, ...]) -> pa.Table:
    return labelled_table([f"text {i}" for i in range(len(labels))], labels, enc, LabelInfo(names, source="x.csv"))


def test_the_book_split_is_split_spams_for_any_number_of_classes(enc: tiktoken.Encoding) -> None:
    labels = [0] * 50 + [1] * 20
    table = _table(enc, labels, ("ham", "spam"))
    ours = split_labelled(table, seed=123, train_ratio=0.7, val_ratio=0.1, balance="undersample", stratify=False)
    book = split_spam(table, seed=123, train_ratio=0.7, val_ratio=0.1)
    assert all(ours[s].equals(book[s]) for s in book)
    three = split_labelled(_table(enc, [0] * 100 + [1] * 60 + [2] * 80, ("a", "b", "c")), seed=1, train_ratio=0.7,
                           val_ratio=0.1, balance="undersample", stratify=False)  # fmt: skip
    got = np.concatenate([t.column("label").to_numpy() for t in three.values()])
    assert Counter(got.tolist()) == {0: 60, 1: 60, 2: 60}


def test_stratified_splits_keep_each_class_share(enc: tiktoken.Encoding) -> None:
    table = _table(enc, [0] * 100 + [1] * 40 + [2] * 20, ("a", "b", "c"))
    splits = split_labelled(table, seed=5, train_ratio=0.7, val_ratio=0.1, balance="none", stratify=True)
    counts = {s: Counter(t.column("label").to_pylist()) for s, t in splits.items()}
    assert counts == {"train": {0: 70, 1: 28, 2: 14}, "val": {0: 10, 1: 4, 2: 2}, "test": {0: 20, 1: 8, 2: 4}}
    again = split_labelled(table, seed=5, train_ratio=0.7, val_ratio=0.1, balance="none", stratify=True)
    assert all(again[s].equals(splits[s]) for s in splits)
    with pytest.raises(ValueError, match=r"class 'c' has too few rows for the splits \(2 train, 0 val, 1 test"):
        split_labelled(_table(enc, [0] * 30 + [1] * 3, ("a", "c")), seed=5, train_ratio=0.7, val_ratio=0.1,
                       balance="none", stratify=True)  # fmt: skip


def test_corpus_globs_directories_and_text_columns(workdir: Path, enc: tiktoken.Encoding) -> None:
    ext = workdir / "data" / "external"
    (ext / "books" / "deep").mkdir(parents=True)
    docs = ["First document.", "Second one, with more words.", "Third: the end."]
    for i, doc in enumerate(docs):
        (ext / "books" / ("deep" if i == 2 else "") / f"{i}.txt").write_text(doc)
    (ext / "books" / ".hidden.txt").write_text("never read")
    (ext / "rows.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    by_glob = corpus_files(["data/external/books/**/*.txt"])
    assert [f.path.name for f in by_glob] == ["0.txt", "1.txt", "2.txt"]
    assert [f.path.name for f in corpus_files(["data/external/books"])] == ["0.txt", "1.txt", "2.txt"]
    (rows,) = corpus_files([{"path": "data/external/rows.jsonl", "column": "body"}])
    assert rows == CorpusFile(ext.relative_to(workdir) / "rows.jsonl", "jsonl", "body")
    encode_corpus(by_glob, enc, workdir / "a.parquet", progress=False)
    stats = encode_corpus([rows], enc, workdir / "b.parquet", progress=False)
    joined = enc.encode("<|endoftext|>".join(docs), allowed_special={"<|endoftext|>"})
    assert read_tokens(workdir / "a.parquet").tolist() == read_tokens(workdir / "b.parquet").tolist() == joined
    assert stats.metrics()["documents"] == 3
    with pytest.raises(FileNotFoundError, match=r"tokenize.corpus\[0\]: data/external/none/\*.txt matches no file"):
        corpus_files(["data/external/none/*.txt"])
