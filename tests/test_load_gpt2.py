"""The load-gpt2 stage: official/URL weights through the real downloader and a real HTTP server,
local checkpoints of every format, and clear failures that leave no half-written base."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import load_stage
from http_server import FileServer, Route

from scratchgpt.data.datasets import write_pretrain_windows
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import load_model, save_model
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.pipeline.load_gpt2 import OFFICIAL, official_source

REPO = Path(__file__).resolve().parents[1]
HF_SIZES = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """A small random GPT-2 saved by transformers: HF tensor names, Conv1D layout, tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **HF_SIZES)).eval()
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture
def workdir(tmp_path: Path, mirror_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like cwd: val windows of the-verdict, the vocabulary and params.yaml."""
    work = tmp_path / "project"
    raw = work / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("vocab.bpe", "encoder.json"):
        (raw / name).write_bytes((mirror_dir / name).read_bytes())
    enc = gpt2_tokenizer(raw)
    tokens = np.array(enc.encode((mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")), dtype=np.uint16)
    write_pretrain_windows(tokens, work / "data" / "processed" / "pretrain", max_length=16, stride=64, train_ratio=0.9)
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCRATCHGPT_PROJECT_ROOT", str(work))
    monkeypatch.delenv("SCRATCHGPT_MIRROR", raising=False)
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    return work


def set_load_params(work: Path, **values) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["load_gpt2"].update(values)
    params["download"].update(retries=2, backoff=0.0, max_backoff=0.0, connect_timeout=2.0, read_timeout=5.0)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage() -> None:
    load_stage("load_gpt2").main([])


def assert_same_logits(base_dir: Path, hf_model) -> None:
    ours = load_model(base_dir).eval()
    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf_model(x).logits, atol=1e-4)


def test_url_base_downloads_through_the_real_downloader_resumes_a_cut_and_converts(workdir, hf_checkpoint):
    hf_dir, hf_model = hf_checkpoint
    body = (hf_dir / "model.safetensors").read_bytes()
    with FileServer({"/m/model.safetensors": Route(body, cut_after=len(body) // 3)}) as server:
        url = server.url("/m/model.safetensors")
        set_load_params(workdir, base=url, sha256=hashlib.sha256(body).hexdigest(), n_heads=2)
        run_stage()
        assert server.range_headers("/m/model.safetensors") == [None, f"bytes={len(body) // 3}-"]

    assert_same_logits(workdir / "models" / "base", hf_model)
    config = json.loads((workdir / "models" / "base" / "config.json").read_text())
    assert config["source"] == {"kind": "url", "url": url, "sha256": hashlib.sha256(body).hexdigest()}
    assert config["model"]["emb_dim"] == 32 and config["model"]["qkv_bias"] is True
    metrics = json.loads((workdir / "metrics" / "load_gpt2.json").read_text())
    assert metrics["parameters"] == sum(p.numel() for p in hf_model.parameters())
    assert 10.0 < metrics["val_loss"] < 11.5 and metrics["val_windows"] == 8  # random weights: about ln(50257)
    assert metrics["val_perplexity"] == pytest.approx(np.exp(metrics["val_loss"]))
    assert not list((workdir / "data").glob("weights.partial/*"))


def test_a_bad_hash_fails_and_leaves_no_base(workdir, hf_checkpoint, caplog):
    hf_dir, _ = hf_checkpoint
    body = (hf_dir / "model.safetensors").read_bytes()
    with FileServer({"/model.safetensors": Route(body)}) as server:
        set_load_params(workdir, base=server.url("/model.safetensors"), sha256="0" * 64)
        with pytest.raises(SystemExit):
            run_stage()
    assert "sha256 mismatch" in caplog.text and "load_gpt2.base=pretrain" in caplog.text
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()
    assert not list((workdir / "data").glob("weights*/*"))  # neither the bad file nor its .part stays


def test_official_size_comes_from_the_pinned_revision_and_is_checked(workdir, hf_checkpoint, monkeypatch, caplog):
    """HF_ENDPOINT points the official download at the local server, which serves other bytes."""
    hf_dir, _ = hf_checkpoint
    pin = OFFICIAL["gpt2-small"]
    path = f"/{pin.repo}/resolve/{pin.revision}/model.safetensors"
    with FileServer({path: Route((hf_dir / "model.safetensors").read_bytes())}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url(""))
        set_load_params(workdir, base="gpt2-small")
        with pytest.raises(SystemExit):
            run_stage()
        assert [p for p, _ in server.requests] == [path]
    assert f"expected {pin.sha256}" in caplog.text
    assert not (workdir / "models").exists()


def test_offline_without_the_file_fails_at_once_naming_file_mirror_and_pretrain(workdir, monkeypatch, caplog):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    set_load_params(workdir, base="gpt2-medium")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["download"].update(retries=4, backoff=30.0, max_backoff=30.0)  # a single retry would wait 30 s
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.monotonic()
    with pytest.raises(SystemExit):
        run_stage()
    assert time.monotonic() - start < 25 and "retry" not in caplog.text
    assert "cannot reach 127.0.0.1:9" in caplog.text
    assert "$SCRATCHGPT_MIRROR/gpt2-medium.safetensors" in caplog.text and "load_gpt2.base=pretrain" in caplog.text

    caplog.clear()
    monkeypatch.setenv("SCRATCHGPT_MIRROR", str(workdir))  # a mirror without the weights
    with pytest.raises(SystemExit):
        run_stage()
    assert "gpt2-medium.safetensors not found in the mirror" in caplog.text and "base=pretrain" in caplog.text


def test_official_weights_from_a_mirror(workdir, hf_checkpoint, monkeypatch):
    """The mirror file is checked against the pin: a tiny stand-in cannot pass, so pin it for the test."""
    hf_dir, hf_model = hf_checkpoint
    mirror = workdir / "mirror"
    mirror.mkdir()
    body = (hf_dir / "model.safetensors").read_bytes()
    (mirror / "gpt2-small.safetensors").write_bytes(body)
    monkeypatch.setenv("SCRATCHGPT_MIRROR", str(mirror))
    pin = OFFICIAL["gpt2-small"]
    stand_in = type(pin)(pin.repo, pin.revision, len(body), hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(OFFICIAL, "gpt2-small", stand_in)
    set_load_params(workdir, base="gpt2-small", n_heads=2)
    run_stage()
    assert_same_logits(workdir / "models" / "base", hf_model)
    source = json.loads((workdir / "models" / "base" / "config.json").read_text())["source"]
    assert source["kind"] == "official" and source["revision"] == pin.revision and source["repo"] == pin.repo
    assert source["name"] == "gpt2-small"
    assert "source" not in json.loads((workdir / "metrics" / "load_gpt2.json").read_text())  # numbers only


def test_local_bases_of_every_format(workdir, hf_checkpoint, caplog):
    caplog.set_level(logging.INFO)
    hf_dir, hf_model = hf_checkpoint
    set_load_params(workdir, base=str(hf_dir), n_heads=None)  # a Hugging Face directory (its config)
    run_stage()
    assert_same_logits(workdir / "models" / "base", hf_model)

    set_load_params(workdir, base=str(hf_dir / "model.safetensors"), n_heads=2)  # the lone file
    run_stage()
    assert_same_logits(workdir / "models" / "base", hf_model)

    from llms_from_scratch.ch04 import GPTModel as BookGPT

    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 48, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    book = BookGPT(cfg).eval()
    torch.save(book.state_dict(), workdir / "model.pth")
    set_load_params(workdir, base="model.pth", n_heads=4)
    run_stage()
    ours = load_model(workdir / "models" / "base").eval()
    x = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours(x), book(x), atol=1e-5)
    source = json.loads((workdir / "models" / "base" / "config.json").read_text())["source"]
    assert source["format"] == "book-state-dict"


def test_pretrain_base_is_the_pipelines_own_checkpoint(workdir, caplog):
    caplog.set_level(logging.INFO)
    model = GPTModel(GPTConfig.from_name("cpu-small", emb_dim=32, n_heads=2, n_layers=1, context_length=16))
    save_model(model, workdir / "models" / "pretrain")
    set_load_params(workdir, base="pretrain")
    run_stage()
    config = json.loads((workdir / "models" / "base" / "config.json").read_text())
    assert config["source"]["kind"] == "pretrain" and config["model"]["emb_dim"] == 32
    assert "greedy continuation: 'Every effort moves you" in caplog.text

    set_load_params(workdir, base="no/such/dir")
    with pytest.raises(SystemExit):
        run_stage()
    assert "neither 'pretrain', an official size" in caplog.text


def test_params_are_validated_before_any_work(workdir, caplog):
    set_load_params(workdir, base="http://example.com/model.safetensors")
    with pytest.raises(SystemExit):
        run_stage()
    assert "pin it with load_gpt2.sha256" in caplog.text
    set_load_params(workdir, base="pretrain", batch_size=0)
    with pytest.raises(SystemExit):
        run_stage()
    assert "batch_size must be a positive integer, got 0" in caplog.text
    assert not (workdir / "models").exists()


def test_official_sources_are_pinned_hub_urls():
    for name, pin in OFFICIAL.items():
        source = official_source(name, "https://huggingface.co")
        assert source.url == f"https://huggingface.co/{pin.repo}/resolve/{pin.revision}/model.safetensors"
        assert source.basename == f"{name}.safetensors" and len(pin.sha256) == 64 and len(pin.revision) == 40
    # parameters * 4 bytes + the per-layer attention-mask buffers + a small header
    assert 124_439_808 * 4 < OFFICIAL["gpt2-small"].size < 124_439_808 * 4 + 12 * 4 * 2**20 + 20_000
