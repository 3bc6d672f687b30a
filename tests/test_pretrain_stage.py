"""The pretrain stage end to end (tiny model on the-verdict), its params, the book preset, and the
stage under a real `dvc exp run` / `dvc repro`."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import load_stage

from scratchgpt.data.datasets import SampleParams, write_pretrain_windows
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import load_model
from scratchgpt.pipeline.pretrain import PretrainParams, check_params
from scratchgpt.plumbing.params import ParamsError, flatten, from_dict, load_section
from scratchgpt.presets import apply_preset, load_preset, set_args, validate
from scratchgpt.train.state import read_trainer_state

REPO = Path(__file__).resolve().parents[1]
# Short windows far apart keep the CPU work small: 73 training windows of 16 tokens, 64 tokens apart,
# a model small enough for a few seconds: 9 optimizer steps of 8 windows.
MAX_LENGTH, STRIDE = 16, 64
TINY = {
    "sample_tokens": 5,
    "model": {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": MAX_LENGTH},
    "train": {"epochs": 1, "batch_size": 8, "eval_freq": 5, "eval_iter": 1, "final_eval_iter": 2,
              "checkpoint_every": 5},
}


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def set_params(workdir: Path, **sections: dict) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    deep_update(params, sections)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def windows_dir(tmp_path_factory, mirror_dir: Path) -> Path:
    """data/processed/pretrain for the-verdict, as the sample stage writes it."""
    out = tmp_path_factory.mktemp("windows") / "pretrain"
    enc = gpt2_tokenizer(mirror_dir)
    tokens = np.array(enc.encode((mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")), dtype=np.uint16)
    counts = write_pretrain_windows(tokens, out, max_length=MAX_LENGTH, stride=STRIDE, train_ratio=0.9)
    assert (counts["train_windows"], counts["val_windows"]) == (73, 8)
    return out


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, windows_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like cwd with the sample stage's windows, the vocabulary and tiny pretrain params."""
    work = tmp_path / "project"
    raw = work / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(mirror_dir / name, raw / name)
    shutil.copytree(windows_dir, work / "data" / "processed" / "pretrain")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, work / name)
    for name in ("src", "stages"):  # the code the checkpoint fingerprint hashes (dvc.yaml's deps)
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(work, sample={"max_length": MAX_LENGTH, "stride": STRIDE}, pretrain=TINY)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCRATCHGPT_PROJECT_ROOT", str(work))
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("SCRATCHGPT_TRACKING", raising=False)
    return work


def run_stage(*args: str) -> None:
    load_stage("pretrain").main(list(args))


def mlflow_runs(workdir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("scratchgpt")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


# --- the stage ------------------------------------------------------------------------------------


def test_stage_writes_checkpoint_metrics_plots_and_one_mlflow_run(workdir: Path):
    run_stage()

    metrics = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 9 and metrics["tokens_seen"] == 9 * 8 * MAX_LENGTH
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert 5 < metrics["val_loss"] < 11.5 and metrics["train_loss"] < 10.9  # it learned something
    assert metrics["tokens_per_s"] > 0 and metrics["session_wall_time_s"] > 0 and metrics["parameters"] > 3_000_000

    with open(workdir / "plots" / "pretrain_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "epoch", "tokens_seen", "train_loss", "val_loss"]
    assert [int(r["step"]) for r in rows] == [1, 6, 9]
    assert float(rows[-1]["val_loss"]) == pytest.approx(metrics["val_loss"])
    assert (workdir / "plots" / "pretrain_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = workdir / "models" / "pretrain"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "trainer_state.pt"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["emb_dim"] == 32 and config["pretrain"]["train"]["batch_size"] == 8
    assert config["checkpoint"]["finished"] and config["checkpoint"]["step"] == 9
    assert set(config["data_sha256"]) == {"train", "val"}
    assert load_model(ckpt).cfg.context_length == MAX_LENGTH
    assert read_trainer_state(ckpt)["step"] == 9

    client, runs = mlflow_runs(workdir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc_stage"] == "pretrain" and run.data.tags["preset"] == "cpu"
    assert run.data.params["pretrain.train.lr"] == "0.003" and run.data.params["sample.max_length"] == "16"
    assert run.data.params["runtime.world_size"] == "1" and run.data.params["runtime.effective_batch_size"] == "8"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 6, 9]
    assert run.data.metrics["final_val_perplexity"] == pytest.approx(metrics["val_perplexity"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pretrain_loss.png", "pretrain_loss.csv", "config.json", "pretrain.json", "samples"} <= artifacts
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/epoch_001.txt", "samples/all_epochs.txt"} <= samples
    text = client.download_artifacts(run.info.run_id, "samples/epoch_001.txt", str(workdir / "dl"))
    assert Path(text).read_text().startswith("Every effort moves you")


def test_rerun_resumes_the_finished_checkpoint_and_a_new_model_config_restarts(workdir: Path, caplog):
    caplog.set_level(logging.INFO)
    run_stage()
    first = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    caplog.clear()
    run_stage()  # e.g. `dvc repro -f`: the persistent checkpoint is complete, nothing to retrain
    assert "resuming from models/pretrain: step 9 of 9" in caplog.text
    assert "holds a finished run with the same params, data and code: reusing it, nothing to train" in caplog.text
    again = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert (again["session_steps"], again["steps"]) == (0, 9) and again["train_time_s"] == first["train_time_s"]
    assert (again["train_loss"], again["val_loss"], again["tokens_seen"]) == (
        first["train_loss"],
        first["val_loss"],
        first["tokens_seen"],
    )
    caplog.clear()
    set_params(workdir, pretrain={"model": {"drop_rate": 0.0}})  # the trainer sees it only via the fingerprint
    run_stage()
    assert "made with other params, data or code (changed: user.model.drop_rate: 0.1 -> 0.0)" in caplog.text
    assert "resuming" not in caplog.text
    assert json.loads((workdir / "models" / "pretrain" / "config.json").read_text())["model"]["drop_rate"] == 0.0


def test_context_shorter_than_the_windows_fails_before_any_work(workdir: Path, caplog):
    set_params(workdir, pretrain={"model": {"context_length": 8}})
    with pytest.raises(SystemExit):
        run_stage()
    assert "pretrain.model.context_length (8)" in caplog.text and "sample.max_length = 16" in caplog.text
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()


def test_unknown_param_and_missing_data_are_clear_errors(workdir: Path, caplog):
    set_params(workdir, pretrain={"train": {"learning_rate": 1e-3}})
    with pytest.raises(SystemExit):
        run_stage()
    assert "pretrain.train" in caplog.text and "learning_rate" in caplog.text

    set_params(workdir, pretrain={"train": {"learning_rate": None}})
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    del params["pretrain"]["train"]["learning_rate"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    (workdir / "data" / "processed" / "pretrain" / "val.parquet").unlink()
    caplog.clear()
    with pytest.raises(SystemExit):
        run_stage()
    assert "val.parquet not found" in caplog.text and "sample-to-parquet" in caplog.text
    assert not (workdir / "models").exists()


# --- params and presets ---------------------------------------------------------------------------


def test_project_params_validate_and_fit_the_sample_windows():
    params = load_section(PretrainParams, "pretrain", REPO / "params.yaml")
    sample = load_section(SampleParams, "sample", REPO / "params.yaml")
    cfg = check_params(params, sample)
    assert params.preset == "cpu" and params.model.preset == "cpu-small"
    assert cfg.context_length >= sample.max_length


def test_model_overrides_are_validated():
    with pytest.raises(ParamsError, match="n_heads"):
        from_dict(PretrainParams, {"model": {"emb_dim": 100, "n_heads": 3}}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain\.model: preset must be one of"):
        from_dict(PretrainParams, {"model": {"preset": "gpt5"}}, "pretrain")


def test_book_preset_exists_in_params_and_matches_the_book():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    preset = load_preset("book", REPO / "presets")
    assert set(flatten(preset)) <= set(flatten(params))  # every key is a real params.yaml key
    merged = apply_preset(params, preset)
    validate(merged)
    pretrain = from_dict(PretrainParams, merged["pretrain"], "pretrain")
    sample = from_dict(SampleParams, merged["sample"], "sample")
    cfg = pretrain.model.config()
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.drop_rate) == (768, 12, 12, 256, 0.1)
    assert not cfg.qkv_bias and not cfg.tie_weights
    t = pretrain.train
    assert (t.batch_size, t.lr, t.weight_decay, t.epochs, t.seed, t.eval_freq, t.eval_iter) == (
        2,
        4e-4,
        0.1,
        10,
        123,
        5,
        5,
    )
    assert (t.lr_schedule, t.warmup_steps, t.warmup_ratio, t.grad_clip, t.grad_accum_steps) == ("constant", 0, 0, 0, 1)
    assert (sample.max_length, sample.stride, sample.train_ratio) == (256, 256, 0.9)
    assert pretrain.preset == "book"


def test_preset_command_line_values_round_trip_through_yaml():
    preset = load_preset("book", REPO / "presets")
    args = set_args(preset)
    assert args[::2] == ["-S"] * (len(args) // 2)
    parsed = {}
    for arg in args[1::2]:
        key, _, literal = arg.partition("=")
        parsed[key] = yaml.safe_load(literal)
    assert parsed == flatten(preset)
    assert isinstance(parsed["pretrain.train.eps"], float) and parsed["pretrain.train.betas"] == [0.9, 0.999]


def test_preset_with_an_unknown_key_or_invalid_value_is_refused(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"pretrain\.train\.learning_rate"):
        apply_preset(params, {"pretrain": {"train": {"learning_rate": 1}}})
    with pytest.raises(ParamsError, match="context_length"):
        validate(apply_preset(params, {"sample": {"max_length": 512}}))  # cpu-small has context 128
    (tmp_path / "bad.yaml").write_text("pretrain:\n  train:\n    lr: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "scratchgpt.presets", "bad", "--presets-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "lr must be" in proc.stderr and not proc.stdout


# --- under DVC ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy
def test_dvc_exp_run_with_a_preset_then_repro_resumes_the_persistent_checkpoint(dvc_project):
    repo, run = dvc_project.path, dvc_project.run
    tiny = {"sample": {"max_length": MAX_LENGTH, "stride": STRIDE}, "pretrain": {"preset": "tiny", **TINY}}
    tiny["pretrain"]["train"] = {**TINY["train"], "betas": [0.9, 0.99], "eps": 1e-7}
    (repo / "presets" / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny preset")

    out = run(sys.executable, "-m", "scratchgpt.presets", "tiny", "--run", "--", "pretrain")
    assert "Running stage 'pretrain'" in out
    metrics = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 9
    config = json.loads((repo / "models" / "pretrain" / "config.json").read_text())
    assert config["train"]["eps"] == 1e-7 and config["train"]["betas"] == [0.9, 0.99]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]
    locked = lock["params"]["params.yaml"]
    assert locked["sample.max_length"] == MAX_LENGTH
    assert locked["pretrain"]["preset"] == "tiny" and locked["pretrain"]["train"]["betas"] == [0.9, 0.99]
    # DVC writes 1e-07, which PyYAML reads as a string; scratchgpt.plumbing.params.parse_yaml reads a float
    assert str(locked["pretrain"]["train"]["eps"]) == "1e-07"
    assert {o["path"] for o in lock["outs"]} >= {"models/pretrain", "plots/pretrain_loss.csv", "metrics/pretrain.json"}
    metrics = json.loads((repo / "metrics" / "pretrain.json").read_text())

    shown = json.loads(run("dvc", "plots", "show", "--json", stdout_only=True))["data"]
    loss_plot = shown["pretrain_loss"][0]["content"]
    assert loss_plot["encoding"]["x"]["field"] == "tokens_seen"
    assert loss_plot["encoding"]["strokeDash"]["scale"]["domain"] == ["train_loss", "val_loss"]
    assert shown["plots/pretrain_loss.png"][0]["type"] == "image"
    assert "pretrain.json" in run("dvc", "metrics", "show")

    assert "Running stage" not in run("dvc", "repro", "pretrain")
    # Forced rerun: DVC keeps the persistent checkpoint, the stage resumes it instead of retraining.
    forced = run("dvc", "repro", "--force", "--single-item", "pretrain")
    assert "resuming from models/pretrain: step 9 of 9" in forced
    again = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert again["val_loss"] == metrics["val_loss"] and again["train_loss"] == metrics["train_loss"]


@pytest.mark.slow
@pytest.mark.heavy
def test_a_code_change_dvc_sees_retrains_from_scratch_and_no_change_is_a_no_op(dvc_project):
    """Issue 11: a rerun DVC triggers through any code dep never reuses the old code's checkpoint."""
    repo, run = dvc_project.path, dvc_project.run
    set_params(repo, sample={"max_length": MAX_LENGTH, "stride": STRIDE}, pretrain=TINY)
    run("git", "commit", "-qam", "tiny params")
    run("dvc", "repro", "pretrain")
    first = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert first["session_steps"] == first["steps"] == 9

    nothing = run("dvc", "repro", "pretrain")
    assert "Running stage" not in nothing and "pretrain" in nothing

    # datasets.py (the window reader) was not part of the fingerprint before issue 11.
    with open(repo / "src" / "scratchgpt" / "data" / "datasets.py", "a") as f:
        f.write("# a change DVC sees\n")
    out = run("dvc", "repro", "pretrain")
    assert "Running stage 'pretrain'" in out
    assert "not reusing the checkpoint in models/pretrain" in out
    assert "user.code.src/scratchgpt/data/datasets.py" in out and "resuming from" not in out
    again = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert again["session_steps"] == again["steps"] == 9
