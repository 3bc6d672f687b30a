"""The lora-cls-finetune stage (spam classifier): data and padding, the three modes, outputs, the
`scratchgpt.apps.classify` command, clear errors before any work, and a SIGKILL mid-run resumed exactly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import load_stage

from scratchgpt.apps.classify import (
    ClassificationDataset,
    ClassifierInfo,
    attach_head,
    classify_texts,
    load_classifier,
    pad_collate,
)
from scratchgpt.data.datasets import SPAM_INFO, build_spam_table, split_spam, with_label_info
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import read_safetensors, save_model
from scratchgpt.nn.lora import count_parameters, merge_lora
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.pipeline.lora_cls_finetune import LABELS, ClsParams, build_model
from scratchgpt.train.losses import classification_logits

REPO = Path(__file__).resolve().parents[1]
BASE = GPTConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)
ROWS = {"train": 96, "val": 24, "test": 40}
TINY = {
    "mode": "lora", "lora_rank": 4, "lora_alpha": 8.0, "max_length": None,
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, "eval_freq": 5, "eval_iter": 2,
              "checkpoint_every": 5, "device": "cpu"},
}  # fmt: skip


@pytest.fixture(scope="module")
def spam_splits(tmp_path_factory, mirror_dir: Path) -> Path:
    """Small, balanced train/val/test splits of the real SMS collection, as sample-to-parquet writes them."""
    from scratchgpt.data.download import extract_member
    from scratchgpt.data.sources import SOURCES

    out = tmp_path_factory.mktemp("spam")
    source = SOURCES["sms-spam-collection"]
    extract_member(mirror_dir / source.basename, "SMSSpamCollection", out / "SMSSpamCollection",
                   expected_sha256=source.member_sha256, max_bytes=1 << 24)  # fmt: skip
    table = build_spam_table(out / "SMSSpamCollection", gpt2_tokenizer(mirror_dir))
    splits = split_spam(table, seed=123, train_ratio=0.7, val_ratio=0.1)
    for name, n in ROWS.items():
        pq.write_table(splits[name].slice(0, n), out / f"{name}.parquet")
    return out


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, spam_splits: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like cwd: a small random base in models/base, the spam splits, dvc.yaml and the code."""
    import shutil

    work = tmp_path / "project"
    (work / "data" / "raw").mkdir(parents=True)
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, work / "data" / "raw" / name)
    shutil.copytree(spam_splits, work / "data" / "processed" / "cls", ignore=shutil.ignore_patterns("SMS*"))
    torch.manual_seed(0)
    save_model(GPTModel(BASE), work / "models" / "base", extra={"source": {"kind": "test"}})
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, work / name)
    for name in ("src", "stages"):  # the code the checkpoint fingerprint hashes (dvc.yaml's deps)
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_cls(work, TINY)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCRATCHGPT_PROJECT_ROOT", str(work))
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("SCRATCHGPT_TRACKING", raising=False)
    return work


def set_cls(work: Path, values: dict) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in values.items():
        if isinstance(value, dict):
            params["cls"][key].update(value)
        else:
            params["cls"][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def classifier_size() -> int:
    return sum(p.numel() for p in attach_head(GPTModel(BASE), 2).parameters())


def run_stage() -> None:
    load_stage("lora_cls_finetune").main([])


# --- data, padding, pooling ---------------------------------------------------------------------


def test_collate_pads_to_the_batch_or_a_fixed_length_and_counts_real_tokens():
    items = [(torch.tensor([5, 6, 7]), 1), (torch.tensor([8]), 0)]
    inputs, lengths, labels = pad_collate()(items)
    assert inputs.tolist() == [[5, 6, 7], [8, 50256, 50256]]
    assert lengths.tolist() == [3, 1] and labels.tolist() == [1, 0]
    inputs, _, _ = pad_collate(pad_to=5)(items)
    assert inputs.tolist() == [[5, 6, 7, 50256, 50256], [8, 50256, 50256, 50256, 50256]]


def test_last_token_pooling_ignores_padding_last_position_does_not():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=12, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0))
    model.eval()
    items = [(torch.tensor([1, 2, 3]), 0), (torch.tensor([4, 5, 6, 7, 8]), 1)]
    with torch.no_grad():
        short = classification_logits(model, pad_collate()(items), "last-token")
        long = classification_logits(model, pad_collate(pad_to=10)(items), "last-token")
        alone = classification_logits(model, pad_collate()(items[:1]), "last-token")
        book = classification_logits(model, pad_collate(pad_to=10)(items), "last-position")
        full = model(pad_collate(pad_to=10)(items)[0])
    assert torch.allclose(short, long, atol=1e-6) and torch.allclose(short[0], alone[0], atol=1e-6)
    assert torch.allclose(book, full[:, -1], atol=1e-6) and not torch.allclose(book[0], short[0])


def test_dataset_truncates_and_refuses_labels_outside_ham_spam(tmp_path: Path):
    pq.write_table(pa.table({"token_ids": [[1, 2, 3, 4], [5]], "label": pa.array([0, 1], pa.int8())}),
                   tmp_path / "ok.parquet")  # fmt: skip
    ds = ClassificationDataset(tmp_path / "ok.parquet", 3, LABELS)
    assert ds[0][0].tolist() == [1, 2, 3] and ds[1] == (ds.ids[1], 1) and ds.longest == 3
    pq.write_table(pa.table({"token_ids": [[1], [2]], "label": pa.array([0, 2], pa.int8())}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"row 1 has label 2, outside 0..1 \(ham, spam\)"):
        ClassificationDataset(tmp_path / "bad.parquet", 3, LABELS)


def test_modes_train_the_right_parameters(tmp_path: Path):
    save_model(GPTModel(BASE), tmp_path / "base")
    def counts(mode):
        return count_parameters(build_model(ClsParams(mode=mode, lora_rank=4, lora_alpha=8.0), tmp_path / "base"))
    full_trainable, total = counts("full")
    assert full_trainable == total
    block = sum(p.numel() for p in GPTModel(BASE).trf_blocks[-1].parameters()) + 2 * 32 + (32 * 2 + 2)
    assert counts("last-block") == (block, total)
    linears = [(32, 32)] * 4 + [(32, 128), (128, 32)]  # per block: q, k, v, out; the MLP
    lora = 2 * sum(4 * (i + o) for i, o in linears) + 4 * (32 + 2)
    assert counts("lora")[0] == lora


def test_merged_lora_classifier_predicts_what_the_adapted_one_did(tmp_path: Path):
    torch.manual_seed(0)
    save_model(GPTModel(BASE), tmp_path / "base")
    model = build_model(ClsParams(mode="lora", lora_rank=4, lora_alpha=8.0), tmp_path / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)  # as after training
    batch = pad_collate()([(torch.tensor([11, 12, 13, 14]), 0), (torch.tensor([15, 16]), 1)])
    model.eval()
    with torch.no_grad():
        before = classification_logits(model, batch, "last-token")
        merge_lora(model)
        after = classification_logits(model, batch, "last-token")
    assert torch.allclose(before, after, atol=1e-5)


# --- the stage ------------------------------------------------------------------------------------


def test_lora_stage_writes_classifier_metrics_plots_and_one_mlflow_run(workdir: Path):
    run_stage()
    metrics = json.loads((workdir / "metrics" / "cls.json").read_text())
    assert set(metrics) >= {"train_accuracy", "val_accuracy", "test_accuracy", "test_precision", "test_recall",
                            "test_f1", "train_loss", "val_loss", "trainable_parameters", "trainable_share",
                            "examples_per_s", "train_time_s", "session_wall_time_s"}  # fmt: skip
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["steps"] == 2 * (96 // 8)
    share = metrics["trainable_parameters"] / (classifier_size() + 4744)
    assert metrics["trainable_share"] == pytest.approx(share, rel=1e-9)
    assert metrics["trainable_parameters"] == 4744  # rank 4 on 12 block linears and the head

    model, info = load_classifier(workdir / "models" / "spam-classifier")
    assert info == ClassifierInfo(("ham", "spam"), "last-token", 48, None) and not model.training
    weights = read_safetensors(workdir / "models" / "spam-classifier" / "model.safetensors")
    assert weights["out_head.weight"].shape == (2, 32) and not any(n.endswith((".A", ".B")) for n in weights)
    config = json.loads((workdir / "models" / "spam-classifier" / "config.json").read_text())
    assert config["cls"]["mode"] == "lora" and config["base"] == {"kind": "test"}
    results = classify_texts(workdir / "models" / "spam-classifier", ["WINNER!! Claim your prize", "see you soon"])
    assert all(label in LABELS and 0.5 <= p <= 1 for label, p in results)

    for name in ("cls_loss.csv", "cls_accuracy.csv"):
        header = (workdir / "plots" / name).read_text().splitlines()[0]
        assert header.startswith("step,epoch,examples_seen,train_")
    for name in ("cls_loss.png", "cls_accuracy.png", "cls_confusion.png"):
        assert (workdir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    assert run.data.tags["dvc_stage"] == "lora-cls-finetune" and run.data.params["cls.mode"] == "lora"
    assert run.data.params["cls.train.lr"] == "0.001" and run.data.params["cls.lora_rank"] == "4"
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")} == {1, 6, 11, 16, 21, 24}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cls_confusion.png", "cls.json", "classifier"} <= artifacts


def test_classify_command_reads_arguments_stdin_and_files(workdir: Path):
    set_cls(workdir, {"mode": "last-block"})
    run_stage()
    model_dir = str(workdir / "models" / "spam-classifier")
    cmd = [sys.executable, "-m", "scratchgpt.classify", "--model", model_dir]
    args = subprocess.run([*cmd, "Free entry! Text WIN now", "lunch?"], capture_output=True, text=True, check=True)
    lines = args.stdout.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in LABELS for line in lines)
    assert lines[1].endswith("\tlunch?") and 0.5 <= float(lines[1].split("\t")[1]) <= 1
    piped = subprocess.run([*cmd, "--json"], input="Free entry! Text WIN now\n\nlunch?\n", capture_output=True,
                           text=True, check=True)  # fmt: skip
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["Free entry! Text WIN now", "lunch?"]
    assert [r["label"] for r in rows] == [line.split("\t")[0] for line in lines]
    (workdir / "texts.txt").write_text("lunch?\n")
    from_file = subprocess.run([*cmd, "--file", "texts.txt"], capture_output=True, text=True, check=True, cwd=workdir)
    assert from_file.stdout == lines[1] + "\n"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_length": 64}, "cls.max_length (64) exceeds the base model's context length (48)"),
        ({"mode": "prompt-tuning"}, "mode must be one of ['lora', 'last-block', 'full']"),
        ({"lora_rank": 0}, "rank"),
        ({"lora_rank": -2}, "rank"),
    ],
)
def test_bad_params_fail_before_any_work(workdir: Path, caplog, values: dict, message: str):
    set_cls(workdir, values)
    with pytest.raises(SystemExit):
        run_stage()
    assert message in caplog.text
    assert not (workdir / "metrics").exists() and not (workdir / "models" / "spam-classifier-ckpt").exists()


def test_bad_data_fails_before_any_work(workdir: Path, caplog):
    val = workdir / "data" / "processed" / "cls" / "val.parquet"
    pq.write_table(pq.read_table(val).slice(0, 0), val)
    with pytest.raises(SystemExit):
        run_stage()
    assert "the val split is empty" in caplog.text
    bad = pa.table({"token_ids": [[1, 2]], "label": pa.array([7], pa.int8())})
    pq.write_table(bad, val)
    caplog.clear()
    with pytest.raises(SystemExit):
        run_stage()
    assert "val.parquet: no label names in its metadata" in caplog.text
    pq.write_table(with_label_info(bad, SPAM_INFO), val)
    caplog.clear()
    with pytest.raises(SystemExit):
        run_stage()
    assert "row 0 has label 7" in caplog.text
    (workdir / "models" / "base" / "model.safetensors").unlink()
    caplog.clear()
    with pytest.raises(SystemExit):
        run_stage()
    assert "run the load-gpt2 stage first" in caplog.text
    assert not (workdir / "metrics").exists() and not (workdir / "models" / "spam-classifier-ckpt").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_lora_fine_tuning_killed_mid_run_resumes_to_identical_weights(workdir: Path, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO)
    set_cls(workdir, {"train": {"epochs": 4, "batch_size": 4, "checkpoint_every": 6}})
    env = {**os.environ, "SCRATCHGPT_TRACKING": "0"}
    stage_cmd = [sys.executable, "stages/lora_cls_finetune.py"]
    state = workdir / "models" / "spam-classifier-ckpt" / "trainer_state.pt"
    proc = subprocess.Popen(stage_cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (workdir / "models" / "spam-classifier").exists()

    resumed = subprocess.run(stage_cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from models/spam-classifier-ckpt: step" in resumed.stderr
    killed_weights = read_safetensors(workdir / "models" / "spam-classifier" / "model.safetensors")

    import shutil

    shutil.rmtree(workdir / "models" / "spam-classifier-ckpt")
    clean = subprocess.run(stage_cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and "resuming" not in clean.stderr
    clean_weights = read_safetensors(workdir / "models" / "spam-classifier" / "model.safetensors")
    assert killed_weights.keys() == clean_weights.keys()
    assert all(torch.equal(killed_weights[k], clean_weights[k]) for k in clean_weights)


def test_book_preset_is_chapter_6():
    from scratchgpt.plumbing.params import from_dict
    from scratchgpt.presets import apply_preset, load_preset, validate

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    merged = apply_preset(params, load_preset("book", REPO / "presets"))
    validate(merged)
    cls = from_dict(ClsParams, merged["cls"], "cls")
    assert merged["load_gpt2"]["base"] == "gpt2-small"
    assert (cls.mode, cls.max_length, cls.pool, cls.drop_rate) == ("last-block", 120, "last-position", 0)
    assert cls.lora_alpha / cls.lora_rank == 16  # the book's LoRA scale (alpha 16, not divided by the rank)
    t = cls.train
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.seed) == (5, 8, 5e-5, 0.1, 123)
    assert (t.eval_freq, t.eval_iter, cls.lora_rank) == (50, 5, 16)
    assert (t.lr_schedule, t.warmup_ratio, t.grad_clip) == ("constant", 0.0, 0.0)
