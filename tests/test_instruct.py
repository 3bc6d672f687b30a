"""The instruct-finetune stage: the book's collate, training through the Trainer (full and LoRA), the
test responses file, the chat command, and clear errors before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import load_stage

from scratchgpt.apps.chat import stream_response
from scratchgpt.apps.instruct import InstructionDataset, extract_response, instruction_collate
from scratchgpt.data.datasets import build_instruction_table, split_instructions
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import load_model, read_safetensors, save_model
from scratchgpt.nn.generate import generate_batch
from scratchgpt.nn.model import GPTConfig, GPTModel

REPO = Path(__file__).resolve().parents[1]
BASE = GPTConfig(vocab_size=50257, context_length=192, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)
ROWS = {"train": 24, "val": 8, "test": 6}
TINY = {"max_new_tokens": 8, "generate_batch_size": 4,
        "train": {"epochs": 1, "batch_size": 4, "eval_freq": 3, "eval_iter": 1, "checkpoint_every": 3,
                  "device": "cpu"}}  # fmt: skip


def test_collate_is_the_books():
    items = [(torch.tensor([1, 2, 3, 4, 5]), 2), (torch.tensor([6, 7, 8]), 2)]
    inputs, targets = instruction_collate()(items)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 50256, 50256]]
    assert targets.tolist() == [[2, 3, 4, 5, 50256], [7, 8, 50256, -100, -100]]
    inputs, targets = instruction_collate(mask_prompt=True)(items)
    assert targets.tolist() == [[-100, 3, 4, 5, 50256], [-100, 8, 50256, -100, -100]]
    inputs, targets = instruction_collate(allowed_max_length=3, pad_id=0, ignore_index=-1)(items)
    assert inputs.tolist() == [[1, 2, 3], [6, 7, 8]] and targets.tolist() == [[2, 3, 4], [7, 8, 0]]


def test_extract_response_drops_the_header():
    assert extract_response("\n\n### Response:\nThe car is as fast as lightning.\n") == (
        "The car is as fast as lightning."
    )


@pytest.fixture(scope="module")
def instruct_splits(tmp_path_factory, mirror_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("instruct")
    table = build_instruction_table(mirror_dir / "instruction-data.json", gpt2_tokenizer(mirror_dir))
    splits = split_instructions(table, train_ratio=0.85, test_ratio=0.1)
    for name, n in ROWS.items():
        pq.write_table(splits[name].slice(0, n), out / f"{name}.parquet")
    return out


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, instruct_splits: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "project"
    (work / "data" / "raw").mkdir(parents=True)
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, work / "data" / "raw" / name)
    shutil.copytree(instruct_splits, work / "data" / "processed" / "instruct")
    torch.manual_seed(0)
    save_model(GPTModel(BASE), work / "models" / "base", extra={"source": {"kind": "test"}})
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, work / name)
    for name in ("src", "stages"):  # the code the checkpoint fingerprint hashes
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_instruct(work, TINY)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCRATCHGPT_PROJECT_ROOT", str(work))
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    return work


def set_instruct(work: Path, values: dict) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in values.items():
        if isinstance(value, dict):
            params["instruct"][key].update(value)
        else:
            params["instruct"][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage() -> None:
    load_stage("instruct_finetune").main([])


def test_stage_trains_saves_and_answers_the_test_split(workdir: Path):
    run_stage()
    metrics = json.loads((workdir / "metrics" / "instruct.json").read_text())
    assert metrics["steps"] == 24 // 4 and metrics["test_responses"] == 6 and metrics["trainable_share"] == 1.0
    assert 5 < metrics["val_loss"] < 11.5 and metrics["tokens_per_s"] > 0 and metrics["response_tokens_per_s"] > 0
    assert "val_loss_batch_mean" not in metrics  # only when asked for (the book preset)

    responses = json.loads((workdir / "data" / "responses" / "instruct_test.json").read_text())
    test = InstructionDataset(workdir / "data" / "processed" / "instruct" / "test.parquet")
    assert [list(r) for r in responses] == [["instruction", "input", "output", "model_response"]] * 6
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in test.records]

    model = load_model(workdir / "models" / "instruct")
    tok = gpt2_tokenizer(workdir / "models" / "instruct")  # the model directory carries its vocabulary
    again = generate_batch(model, [p.tolist() for p in test.prompts], 8, eos_id=50256, pad_id=50256)
    assert [r["model_response"] for r in responses] == [extract_response(tok.decode(t)) for t in again]
    config = json.loads((workdir / "models" / "instruct" / "config.json").read_text())
    assert config["base"] == {"kind": "test"} and config["instruct"]["method"] == "full"
    assert (workdir / "plots" / "instruct_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "plots" / "instruct_loss.csv").read_text().startswith("step,epoch,tokens_seen,train_loss")

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    assert run.data.tags["dvc_stage"] == "instruct-finetune" and run.data.params["instruct.method"] == "full"
    assert "instruct_test.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    (version,) = client.search_model_versions("name='instruct'")  # registered by the stage (tests/test_serving.py)
    assert version.run_id == run.info.run_id and version.tags["method"] == "full"
    served = mlflow.pyfunc.load_model(f"models:/instruct/{version.version}")
    asked = pd.DataFrame(test.records[:2]).drop(columns="output")
    assert served.predict(asked)["response"].tolist() == [r["model_response"] for r in responses[:2]]

    # the chat command answers with the same greedy tokens, streamed
    pieces = list(stream_response(model, tok, test.records[0]["instruction"], test.records[0]["input"],
                                  max_new_tokens=8))  # fmt: skip
    assert "".join(pieces) == responses[0]["model_response"]
    cmd = [sys.executable, "-m", "scratchgpt.chat", "--model", "models/instruct", "--max-new-tokens", "8"]
    once = subprocess.run([*cmd, "--once", test.records[0]["instruction"], "--input", test.records[0]["input"]],
                          capture_output=True, text=True, check=True, cwd=workdir)  # fmt: skip
    assert once.stdout == "".join(pieces) + "\n"
    piped = subprocess.run(cmd, input=f"{test.records[0]['instruction']}\n\n{test.records[0]['input']}\n\n",
                           capture_output=True, text=True, check=True, cwd=workdir)  # fmt: skip
    assert piped.stdout == once.stdout


def test_lora_method_trains_adapters_and_saves_merged_weights(workdir: Path):
    set_instruct(workdir, {"method": "lora", "lora_rank": 2, "lora_alpha": 4.0, "mask_prompt": True,
                           "batch_mean_loss": True})  # fmt: skip
    run_stage()
    metrics = json.loads((workdir / "metrics" / "instruct.json").read_text())
    assert 0 < metrics["trainable_share"] < 0.05
    # the book's per-batch means beside the token means: with masked prompts, not the same number
    assert 5 < metrics["val_loss_batch_mean"] < 11.5 and metrics["val_loss_batch_mean"] != metrics["val_loss"]
    assert "train_loss_batch_mean" in metrics
    weights = read_safetensors(workdir / "models" / "instruct" / "model.safetensors")
    assert not any(name.endswith((".A", ".B")) for name in weights)
    base = read_safetensors(workdir / "models" / "base" / "model.safetensors")
    assert torch.equal(weights["tok_emb.weight"], base["tok_emb.weight"])  # frozen
    assert not torch.equal(weights["trf_blocks.0.att.W_query.weight"], base["trf_blocks.0.att.W_query.weight"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "prefix"}, "method must be one of ['full', 'lora']"),
        ({"max_new_tokens": 192}, "max_new_tokens (192) must be below the base's context length (192)"),
        ({"lora_rank": 0}, "rank"),
    ],
)
def test_bad_params_fail_before_any_work(workdir: Path, caplog, values: dict, message: str):
    set_instruct(workdir, values)
    with pytest.raises(SystemExit):
        run_stage()
    assert message in caplog.text
    assert not (workdir / "metrics").exists() and not (workdir / "models" / "instruct-ckpt").exists()


def test_empty_split_fails_before_any_work(workdir: Path, caplog):
    val = workdir / "data" / "processed" / "instruct" / "val.parquet"
    pq.write_table(pq.read_table(val).slice(0, 0), val)
    with pytest.raises(SystemExit):
        run_stage()
    assert "the val split is empty" in caplog.text and not (workdir / "models" / "instruct-ckpt").exists()


def test_book_preset_is_chapter_7():
    from scratchgpt.pipeline.instruct_finetune import InstructParams
    from scratchgpt.plumbing.params import from_dict
    from scratchgpt.presets import apply_preset, load_preset, validate

    merged = apply_preset(yaml.safe_load((REPO / "params.yaml").read_text()), load_preset("book", REPO / "presets"))
    validate(merged)
    p = from_dict(InstructParams, merged["instruct"], "instruct")
    assert (p.method, p.mask_prompt, p.allowed_max_length) == ("full", False, 1024)
    assert (p.max_new_tokens, p.temperature) == (256, 0.0)
    t = p.train
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.seed) == (2, 8, 5e-5, 0.1, 123)
    assert (t.eval_freq, t.eval_iter, t.lr_schedule, t.grad_clip) == (5, 5, "constant", 0.0)
    assert p.batch_mean_loss  # the book's per-batch mean losses, beside the token means


@pytest.mark.slow
@pytest.mark.heavy
def test_nproc_2_trains_under_torchrun_and_rank_0_answers(workdir: Path, tmp_path: Path):
    """`instruct.train.nproc: 2`: the stage relaunches itself as two gloo processes; rank 0 alone writes
    the model, the responses, the metrics and the one MLflow run, which records the world size."""
    set_instruct(workdir, {"train": {"nproc": 2, "batch_size": 2}})  # a global batch of 4, as TINY's
    env = dict(os.environ, PYTHONPATH=str(workdir / "src"), TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "stages/instruct_finetune.py"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((workdir / "metrics" / "instruct.json").read_text())
    assert metrics["steps"] == 24 // 4 and metrics["test_responses"] == 6
    assert len(json.loads((workdir / "data" / "responses" / "instruct_test.json").read_text())) == 6

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    assert run.data.params["runtime.world_size"] == "2" and run.data.params["runtime.effective_batch_size"] == "4"
