"""The tokenize and sample-to-parquet stage scripts, and the data pipeline under a real `dvc repro`."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import load_stage

from scratchgpt.data.datasets import TokenWindowDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like cwd: the download stage's outputs in data/raw and the project's params.yaml."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("the-verdict.txt", "instruction-data.json", "vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, raw / name)
    with zipfile.ZipFile(mirror_dir / "sms+spam+collection.zip") as zf:
        (raw / "SMSSpamCollection").write_bytes(zf.read("SMSSpamCollection"))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(workdir: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def test_params_yaml_blocks_match_the_cpu_preset() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["tokenize"]["corpus"] == ["data/raw/the-verdict.txt"]
    sample = params["sample"]
    assert (sample["max_length"], sample["stride"], sample["train_ratio"], sample["seed"]) == (64, 64, 0.9, 123)


def test_tokenize_then_sample(workdir: Path) -> None:
    load_stage("tokenize_data").main([])
    interim = workdir / "data" / "interim"
    assert sorted(p.name for p in interim.iterdir()) == ["cls.parquet", "instruct.parquet", "pretrain_tokens.parquet"]
    m = json.loads((workdir / "metrics" / "tokenize.json").read_text())
    assert {k: m[k] for k in ("documents", "characters", "tokens")} == {
        "documents": 1,
        "characters": 20479,
        "tokens": 5145,
    }
    assert m["chars_per_token"] == pytest.approx(20479 / 5145, abs=1e-4)
    assert (m["spam"]["rows"], m["spam"]["ham"], m["spam"]["spam"], m["instruct"]["records"]) == (5574, 4827, 747, 1100)

    load_stage("sample_to_parquet").main([])
    processed = workdir / "data" / "processed"
    m = json.loads((workdir / "metrics" / "sample.json").read_text())
    assert m["spam"] == {"train": 1045, "val": 149, "test": 300}
    assert m["instruct"] == {"train": 935, "val": 55, "test": 110}
    assert m["pretrain"] == {
        "train_windows": 72, "train_tokens": 4630, "val_windows": 8, "val_tokens": 515, "max_length": 64, "stride": 64
    }  # fmt: skip
    for split, n in m["spam"].items():
        assert pq.read_metadata(processed / "cls" / f"{split}.parquet").num_rows == n
    for split, n in m["instruct"].items():
        assert pq.read_metadata(processed / "instruct" / f"{split}.parquet").num_rows == n
    train = TokenWindowDataset(processed / "pretrain" / "train.parquet")
    assert (len(train), train.max_length) == (72, 64)
    assert pq.read_schema(processed / "pretrain" / "train.parquet").field("window").type == pa.list_(pa.uint16(), 65)
    assert train[0][0][:4].tolist() == [40, 367, 2885, 1464]


def test_tokenize_bad_instruction_record_fails_cleanly(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = workdir / "data" / "raw" / "instruction-data.json"
    records = json.loads(path.read_text())
    del records[7]["output"]
    path.write_text(json.dumps(records))
    with pytest.raises(SystemExit) as exit_info:
        load_stage("tokenize_data").main([])
    assert exit_info.value.code == 1
    assert "record 7 has no 'output' key" in caplog.text
    assert not (workdir / "data" / "interim").exists()
    assert not (workdir / "metrics").exists()


def test_tokenize_non_utf8_corpus_fails_cleanly(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = workdir / "data" / "raw" / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    set_params(workdir, "tokenize", corpus=["data/raw/the-verdict.txt", "data/raw/latin1.txt"])
    with pytest.raises(SystemExit):
        load_stage("tokenize_data").main([])
    assert "data/raw/latin1.txt: not valid UTF-8 at byte offset 3" in caplog.text
    assert not (workdir / "data" / "interim").exists()
    assert list((workdir / "data").iterdir()) == [workdir / "data" / "raw"]  # no temporary directory left


def test_sample_too_short_corpus_fails_cleanly(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_stage("tokenize_data").main([])
    set_params(workdir, "sample", max_length=600)
    with pytest.raises(SystemExit):
        load_stage("sample_to_parquet").main([])
    assert "corpus too short: the val split has 515 of 5145 tokens" in caplog.text
    assert not (workdir / "data" / "processed").exists()


@pytest.mark.slow
def test_dvc_repro_sample_to_parquet(dvc_project) -> None:
    """download -> tokenize -> sample-to-parquet under real DVC: outputs, a no-op rerun, an experiment."""
    repo, run = dvc_project.path, dvc_project.run
    out = run("dvc", "repro", "sample-to-parquet")
    for stage in ("download", "tokenize", "sample-to-parquet"):
        assert f"Running stage '{stage}'" in out
    sample = json.loads((repo / "metrics" / "sample.json").read_text())
    assert sample["spam"] == {"train": 1045, "val": 149, "test": 300}
    assert sample["instruct"] == {"train": 935, "val": 55, "test": 110}
    assert (sample["pretrain"]["train_windows"], sample["pretrain"]["val_windows"]) == (72, 8)
    assert json.loads((repo / "metrics" / "tokenize.json").read_text())["tokens"] == 5145
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"download", "tokenize", "sample-to-parquet"} <= set(lock)
    assert lock["sample-to-parquet"]["params"]["params.yaml"]["sample"]["max_length"] == 64

    again = run("dvc", "repro", "sample-to-parquet")
    assert "Running stage" not in again
    assert "didn't change" in again or "up to date" in again

    # An experiment that changes one sample param reruns only sample-to-parquet.
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "pipeline run")
    exp = run("dvc", "exp", "run", "-S", "sample.max_length=32", "-S", "sample.stride=32", "sample-to-parquet")
    assert "Running stage 'sample-to-parquet'" in exp
    assert "Running stage 'tokenize'" not in exp and "Running stage 'download'" not in exp
    sample = json.loads((repo / "metrics" / "sample.json").read_text())
    pretrain = sample["pretrain"]
    assert (pretrain["max_length"], pretrain["stride"], pretrain["train_windows"]) == (32, 32, 144)  # twice 72
    assert TokenWindowDataset(repo / "data" / "processed" / "pretrain" / "train.parquet").max_length == 32
