"""The classifier and the instruction model in MLflow's registry: what the registered versions predict (the
same as our own code), a real `mlflow models serve` answering REST requests, versions per stage execution,
and nothing logged when tracking or registering is off."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from helpers import free_port, load_stage, stop_group, wait_healthy
from test_cls_finetune import set_cls, spam_splits, workdir  # noqa: F401  (fixtures: the stage's tiny project)
from test_stage_deps import import_closure

from scratchgpt.apps import serving
from scratchgpt.apps.classify import (
    PAD_ID,
    ClassifierInfo,
    attach_head,
    load_classifier,
    predict_proba,
    save_classifier,
)
from scratchgpt.apps.instruct import END_OF_TEXT, extract_response
from scratchgpt.data.datasets import format_prompt
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import load_model, save_model
from scratchgpt.nn.generate import generate_batch
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.pipeline.instruct_finetune import InstructParams, InstructPaths, save_instruct_model
from scratchgpt.plumbing import tracking

REPO = Path(__file__).resolve().parents[1]
TINY = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
TEXTS = ["WINNER!! Claim your £1000 prize now, text WIN to 80086", "see you at lunch?", "", "Ok lar... Joking"]
RECORDS = [{"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast."},
           {"instruction": "Name the author of 'Pride and Prejudice'.", "input": ""}]  # fmt: skip
MAX_NEW_TOKENS = 6


@dataclass
class Registry:
    uri: str
    classifier_dir: Path
    instruct_dir: Path
    versions: dict  # registered model name -> ModelVersion


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mirror_dir: Path):
    """A tiny random classifier and instruction model, saved as their stages save them and registered through
    `serving` from stage runs in a fresh SQLite store (MLFLOW_TRACKING_URI points at it for the module)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    torch.manual_seed(0)
    classifier_dir, instruct_dir = tmp / "spam-classifier", tmp / "instruct"
    info = ClassifierInfo(("ham", "spam"), "last-token", 64, None)
    save_classifier(attach_head(GPTModel(TINY), 2), classifier_dir, info, vocab_dir=mirror_dir)
    base = GPTModel(TINY)
    save_model(base, tmp / "base", extra={"source": {"kind": "test"}})
    save_instruct_model(base, InstructPaths(base_dir=tmp / "base", vocab_dir=mirror_dir, out_dir=instruct_dir),
                        InstructParams())  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("SCRATCHGPT_PROJECT_ROOT", str(tmp))
        for name in ("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", "SCRATCHGPT_TRACKING", serving.ENV_REGISTER):
            mp.delenv(name, raising=False)
        with tracking.stage_run("lora-cls-finetune", {"cls": {"mode": "full"}}) as run:
            clf = serving.log_classifier(run, classifier_dir, {"test_accuracy": 0.5, "test_f1": 0.25}, {"mode": "full"})
        with tracking.stage_run("instruct-finetune", {"instruct": {"method": "full"}}) as run:
            bot = serving.log_instruct_model(run, instruct_dir, {"val_loss": 9.5}, max_new_tokens=MAX_NEW_TOKENS,
                                             temperature=0.0)  # fmt: skip
        yield Registry(uri, classifier_dir, instruct_dir, {"spam-classifier": clf, "instruct": bot})


def our_classification(model_dir: Path, texts: list[str]) -> tuple[list[str], list[float]]:
    """Labels and their probabilities straight from `classify.predict_proba`."""
    model, info = load_classifier(model_dir)
    enc = gpt2_tokenizer(model_dir)
    probs = predict_proba(model, [torch.tensor(enc.encode_ordinary(t) or [PAD_ID]) for t in texts], info)
    best = probs.argmax(-1)
    return [info.labels[int(k)] for k in best], [float(probs[i, k]) for i, k in enumerate(best)]


def our_responses(model_dir: Path, records: list[dict], max_new_tokens: int) -> list[str]:
    """What the instruct-finetune stage's generation answers: the Alpaca prompt, `generate_batch`, the clean-up."""
    model, enc = load_model(model_dir), gpt2_tokenizer(model_dir)
    prompts = [enc.encode_ordinary(format_prompt(r)) for r in records]
    out = generate_batch(model, prompts, max_new_tokens, eos_id=END_OF_TEXT, pad_id=END_OF_TEXT)
    return [extract_response(enc.decode(tokens)) for tokens in out]


def test_registered_classifier_predicts_what_classify_does(registry: Registry):
    version = registry.versions["spam-classifier"]
    assert str(version.version) == "1" and version.tags == {"test_accuracy": "0.5", "test_f1": "0.25", "mode": "full"}
    assert "test_accuracy 0.5, test_f1 0.25" in version.description
    model = mlflow.pyfunc.load_model("models:/spam-classifier/1")
    got = model.predict(pd.DataFrame({"text": TEXTS}))
    labels, probs = our_classification(registry.classifier_dir, TEXTS)
    assert list(got.columns) == ["label", "probability"] and got["label"].tolist() == labels
    assert got["probability"].tolist() == pytest.approx(probs, abs=1e-6)

    # the artifact is our model directory, byte for byte; the requirements are pinned, nothing inferred
    local = Path(mlflow.artifacts.download_artifacts("models:/spam-classifier/1"))
    weights = next(local.glob("artifacts/*/model.safetensors"))
    assert sha256(weights) == sha256(registry.classifier_dir / "model.safetensors")
    assert (local / "requirements.txt").read_text().split() == serving.pip_requirements()
    assert all("==" in r and "+" not in r for r in serving.pip_requirements())


def test_registered_instruct_model_answers_what_our_generation_does(registry: Registry):
    version = registry.versions["instruct"]
    assert str(version.version) == "1" and version.tags == {"val_loss": "9.5"}
    model = mlflow.pyfunc.load_model("models:/instruct/latest", model_config={"device": "cpu", "batch_size": 1})
    assert model.model_config == {"device": "cpu", "batch_size": 1}
    got = model.predict(pd.DataFrame(RECORDS))
    assert got["response"].tolist() == our_responses(registry.instruct_dir, RECORDS, MAX_NEW_TOKENS)
    assert all(got["response"])
    shorter = model.predict(pd.DataFrame(RECORDS), params={"max_new_tokens": 2})
    assert shorter["response"].tolist() == our_responses(registry.instruct_dir, RECORDS, 2)
    no_input = model.predict(pd.DataFrame({"instruction": [RECORDS[1]["instruction"]]}))  # input is optional
    assert no_input["response"].tolist() == got["response"].tolist()[1:]
    with pytest.raises(mlflow.exceptions.MlflowException, match="max_new_tokens"):
        model.predict(pd.DataFrame(RECORDS), params={"max_new_tokens": TINY.context_length})


def test_requirements_cover_every_distribution_the_wrappers_import():
    files = import_closure(REPO / "src" / "scratchgpt" / "apps" / "serving.py")
    tops = set()
    for path in files:
        for node in ast.walk(ast.parse((REPO / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    third_party = sorted(t for t in tops if t not in sys.stdlib_module_names and t not in {"scratchgpt", "__future__"})
    pinned = {r.split("==")[0].lower() for r in serving.pip_requirements()}
    missing = [t for t in third_party if not {d.lower() for d in owners[t]} & pinned]
    assert not missing, f"serving.REQUIREMENTS lacks the distribution of {missing}"


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_scoring_requests(registry: Registry, tmp_path: Path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/spam-classifier/1",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, timeout=120)
        status, body = post(port, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
        assert status == 200, f"{body}\n{log.read_text()[-3000:]}"
        labels, probs = our_classification(registry.classifier_dir, TEXTS)
        assert [p["label"] for p in body["predictions"]] == labels
        assert [p["probability"] for p in body["predictions"]] == pytest.approx(probs, abs=1e-6)
        status, body = post(port, {"dataframe_records": [{"message": "no text column"}]})
        assert status == 400 and "text" in body["message"], body
    finally:
        stop_group(proc)


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_nothing_is_logged_when_tracking_or_registering_is_off(registry: Registry, monkeypatch: pytest.MonkeyPatch):
    assert serving.log_classifier(tracking.StageRun.disabled(), registry.classifier_dir, {}) is None
    monkeypatch.setenv(serving.ENV_REGISTER, "0")
    with tracking.stage_run("lora-cls-finetune", None) as run:
        assert serving.log_classifier(run, registry.classifier_dir, {}) is None
    monkeypatch.delenv(serving.ENV_REGISTER)
    with tracking.stage_run("lora-cls-finetune", None) as run, pytest.raises(FileNotFoundError, match="safetensors"):
        serving.log_classifier(run, registry.classifier_dir.parent / "nowhere", {})
    client = mlflow.MlflowClient(registry.uri)
    assert [str(v.version) for v in client.search_model_versions("name='spam-classifier'")] == ["1"]


@pytest.mark.slow
def test_each_stage_execution_registers_a_version_even_when_it_reuses_its_checkpoint(workdir: Path, capfd):  # noqa: F811
    set_cls(workdir, {"mode": "last-block", "train": {"epochs": 1, "batch_size": 32, "checkpoint_every": 0}})
    stage = load_stage("lora_cls_finetune")
    stage.main([])
    stage.main([])  # DVC would skip it; run by hand it finds its finished checkpoint and still executes
    assert "Downloading artifacts" not in capfd.readouterr().err  # MLflow's copy bar stays out of the stage log
    assert json.loads((workdir / "metrics" / "cls.json").read_text())["session_steps"] == 0
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id], order_by=["start_time ASC"])
    versions = sorted(client.search_model_versions("name='spam-classifier'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert [v.run_id for v in versions] == [r.info.run_id for r in runs]
    metrics = json.loads((workdir / "metrics" / "cls.json").read_text())
    assert versions[1].tags["test_accuracy"] == f"{metrics['test_accuracy']:.6g}"
    assert versions[1].tags["mode"] == "last-block"
    assert runs[1].data.metrics["registry_time_s"] > 0

    got = mlflow.pyfunc.load_model("models:/spam-classifier/2").predict(pd.DataFrame({"text": TEXTS}))
    labels, probs = our_classification(workdir / "models" / "spam-classifier", TEXTS)
    assert got["label"].tolist() == labels and got["probability"].tolist() == pytest.approx(probs, abs=1e-6)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
