"""The evaluate stage end to end in a temporary project: a tiny random model, a four-record test split with
known responses, the other stages' metrics, no judge and a judge served by a real local HTTP server."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import load_stage
from ollama_server import FakeOllama, Reply, Slow, Status
from openai_server import FakeOpenAI

from scratchgpt.data.datasets import build_instruction_table
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn.checkpoint import save_model
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.pipeline.evaluate import EvaluateParams, exact_match, normalize, rouge_l
from scratchgpt.pipeline.judge import score_prompt
from scratchgpt.plumbing.params import ParamsError, from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = GPTConfig(vocab_size=50257, context_length=96, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
# (instruction, input, reference, the model's response, ROUGE-L F1 worked out by hand)
CASES = [
    ("Name the author of 'Pride and Prejudice'.", "", "Jane Austen.", "  Jane\n  Austen. ", 1.0),
    ("Rewrite the sentence using a simile.", "The car is very fast.", "The car is as fast as lightning.", "The",
     2 * (1 / 7) / (1 + 1 / 7)),  # LCS 1 word: precision 1/1, recall 1/7
    ("What is the chemical symbol for mercury?", "", "Hg.", "", 0.0),
    ("Convert 3 kilometers to meters.", "", "3 kilometers is 3000 meters.", "3 Kilometer is 3000 meter", 1.0),  # stems
]  # fmt: skip
RECORDS = [{"instruction": c[0], "input": c[1], "output": c[2]} for c in CASES]
RESPONSES = [{**r, "model_response": c[3]} for r, c in zip(RECORDS, CASES, strict=True)]
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, mirror_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("split")
    (out / "records.json").write_text(json.dumps(RECORDS))
    pq.write_table(build_instruction_table(out / "records.json", gpt2_tokenizer(mirror_dir)), out / "test.parquet")
    return out / "test.parquet"


@pytest.fixture
def project(tmp_path: Path, test_split: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "project"
    (work / "data" / "processed" / "instruct").mkdir(parents=True)
    shutil.copy(test_split, work / "data" / "processed" / "instruct" / "test.parquet")
    torch.manual_seed(0)
    base = {"kind": "pretrain", "path": "models/pretrain", "sha256": "0" * 64}
    save_model(GPTModel(TINY), work / "models" / "instruct", extra={"base": base})
    write_json(work / "data" / "responses" / "instruct_test.json", RESPONSES)
    write_json(work / "metrics" / "pretrain.json", {"val_loss": 6.25, "val_perplexity": math.exp(6.25), "steps": 9})
    write_json(work / "metrics" / "instruct.json", {"train_loss": 2.5, "val_loss": 2.75})  # no cls.json
    (work / "plots").mkdir()
    (work / "plots" / "pretrain_loss.png").write_bytes(PNG)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    set_params(work, device="cpu", batch_size=4, examples_in_report=2)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCRATCHGPT_PROJECT_ROOT", str(work))
    monkeypatch.delenv("SCRATCHGPT_MLFLOW_PARENT_RUN_ID", raising=False)
    return work


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def set_params(work: Path, **values) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage() -> None:
    load_stage("evaluate").main([])


def expected_response_loss(work: Path) -> float:
    """Cross-entropy over every response target (and the end-of-text after it) of the four examples in one
    batch, computed here from the model's logits without the stage's collate."""
    from scratchgpt.apps.instruct import InstructionDataset
    from scratchgpt.nn.checkpoint import load_model

    model = load_model(work / "models" / "instruct")
    ds = InstructionDataset(work / "data" / "processed" / "instruct" / "test.parquet")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_prompt in (ds[i] for i in range(len(ds))):
            logp = torch.log_softmax(model(ids[None])[0].double(), dim=-1)
            targets = [*ids[1:].tolist(), 50256]
            for t in range(n_prompt - 1, len(ids)):
                total -= logp[t, targets[t]].item()
                count += 1
    return total / count


def test_the_response_loss_does_not_depend_on_the_batch_size(project: Path):
    from scratchgpt.apps.instruct import InstructionDataset
    from scratchgpt.nn.checkpoint import load_model
    from scratchgpt.pipeline.evaluate import response_loss

    model = load_model(project / "models" / "instruct")
    test = InstructionDataset(project / "data" / "processed" / "instruct" / "test.parquet")
    want = expected_response_loss(project)
    for batch_size in (1, 3, 4):
        loss, examples, tokens = response_loss(model, test, batch_size, torch.device("cpu"))
        assert loss == pytest.approx(want, rel=1e-5) and examples == 4, batch_size
        assert tokens == sum(len(ids) - n_prompt + 1 for ids, n_prompt in (test[i] for i in range(4)))


def mlflow_run(work: Path):
    runs = mlflow.search_runs(experiment_names=["scratchgpt"], filter_string="tags.dvc_stage = 'evaluate'",
                              output_format="list")  # fmt: skip
    assert len(runs) == 1
    return runs[0]


def test_text_scores(caplog):
    assert normalize("  Jane\n\t Austen.  ") == "Jane Austen."
    assert exact_match("  Jane\n  Austen. ", "Jane Austen.") and not exact_match("jane austen.", "Jane Austen.")
    with caplog.at_level(logging.DEBUG):
        scores = rouge_l([c[3] for c in CASES], [c[2] for c in CASES])
    assert scores == pytest.approx([c[4] for c in CASES])
    assert rouge_l(["the cats running"], ["a cat runs"]) == pytest.approx([2 / 3])  # stemmed: cat, run
    assert caplog.records == []  # rouge-score's "absl INFO Using default tokenizer." stays out of the stage log


def test_params_are_checked():
    assert EvaluateParams().judge == "none"
    assert from_dict(EvaluateParams, {"judge": "openai"}, "evaluate").api_key_env == "OPENAI_API_KEY"
    with pytest.raises(ParamsError, match="api_key_env must name an environment variable"):
        from_dict(EvaluateParams, {"judge": "openai", "api_key_env": "sk-123"}, "evaluate")
    with pytest.raises(ParamsError, match=r"judge must be one of \['none', 'ollama', 'openai'\]"):
        from_dict(EvaluateParams, {"judge": "llama"}, "evaluate")
    with pytest.raises(ParamsError, match="url must be an http"):
        from_dict(EvaluateParams, {"url": "localhost:11434"}, "evaluate")
    with pytest.raises(ParamsError, match="timeout must be a positive number"):
        from_dict(EvaluateParams, {"timeout": 0}, "evaluate")
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['judge_url'\]"):
        from_dict(EvaluateParams, {"judge_url": "http://x"}, "evaluate")


def test_without_a_judge(project: Path):
    run_stage()
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"pretrain", "instruct", "test"}  # cls.json is missing; no judge
    assert metrics["pretrain"] == {"val_loss": 6.25, "val_perplexity": pytest.approx(math.exp(6.25))}
    assert metrics["instruct"] == {"train_loss": 2.5, "val_loss": 2.75}
    test = metrics["test"]
    assert test["examples"] == 4 and test["loss_examples"] == 4 and test["truncated_examples"] == 0
    assert test["loss_tokens"] > 4
    assert test["exact_match"] == 0.25
    assert test["rouge_l"] == pytest.approx(sum(c[4] for c in CASES) / 4)
    assert test["distinct_responses"] == 4 and test["empty_responses"] == 1
    assert test["response_loss"] == pytest.approx(expected_response_loss(project), rel=1e-5)
    assert test["response_perplexity"] == pytest.approx(math.exp(test["response_loss"]))
    assert 9.5 < test["response_loss"] < 12  # a random model: about ln(50257)

    report = (project / "reports" / "eval.md").read_text()
    assert "Judge: none" in report and "| evaluate | judge score, mean of 0–100 | — (no judge) |" in report
    assert "| pretrain | validation loss | 6.250 |" in report and "| instruct-finetune | train loss | 2.500 |" in report
    assert "| evaluate | exact match | 1 of 4 (25.0%) |" in report
    assert f"| evaluate | ROUGE-L F1, mean | {test['rouge_l']:.3f} |" in report
    assert f"| response tokens the loss averages over | {test['loss_tokens']} |" in report
    assert "metrics/cls.json not found (run `dvc repro lora-cls-finetune`)" in report
    assert "| lora-cls-finetune | classifier test accuracy | — |" in report
    assert "macro-F1" not in report and "positive class" not in report  # optional: left out when absent
    assert "![Pretraining loss](../plots/pretrain_loss.png)" in report
    assert "*Instruction fine-tuning loss: no plot yet (run `dvc repro instruct-finetune`).*" in report
    assert "this pipeline's own model" in report and "not as instruction following" in report
    # responses beside references; best and worst by ROUGE-L, two each
    assert "| 1 | Rewrite the sentence using a simile.<br>*Input:* The car is very fast. | " in report
    assert "| Jane<br>  Austen. | 1.00 |" in report
    assert "### Best 2 by ROUGE-L" in report and "### Worst 2 by ROUGE-L" in report
    worst = report.split("### Worst 2 by ROUGE-L")[1]
    assert "| 2 | What is the chemical symbol for mercury? | Hg. | *(empty)* | 0.00 |" in worst

    scores = json.loads((project / "reports" / "eval_scores.json").read_text())
    assert [s["exact_match"] for s in scores] == [True, False, False, False]
    assert [s["rouge_l"] for s in scores] == pytest.approx([c[4] for c in CASES])
    assert "judge_score" not in scores[0]

    run = mlflow_run(project)
    assert run.info.status == "FINISHED"
    assert run.data.params["evaluate.judge"] == "none" and run.data.tags["base.kind"] == "pretrain"
    assert run.data.metrics["test.rouge_l"] == pytest.approx(test["rouge_l"])
    assert run.data.metrics["pretrain.val_loss"] == 6.25
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "config.json", "params.json", "reports", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "reports")} == {
        "reports/eval.md", "reports/eval_scores.json"}  # fmt: skip
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/pretrain_loss.png"}


def test_with_an_ollama_judge(project: Path):
    def answer(body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        if "Jane Austen" in prompt:
            return Reply("95")
        if "mercury" in prompt:
            return Reply("The response is empty, so I give it 0.")
        return Reply("30" if "simile" in prompt else "80")

    with FakeOllama(answer, script=[Status(500, "loading model")]) as server:  # the first request fails once
        set_params(project, judge="ollama", url=server.url, model="llama3", retries=2, backoff=0.0, timeout=10.0)
        run_stage()
        assert server.requests[0] == ("GET", "/api/tags") and len(server.chats) == 5
        assert all(c["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048} for c in server.chats)

    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["judge"] == {"judged": 3, "unparseable": 1, "failed": 0, "mean_score": pytest.approx(205 / 3)}
    assert metrics["test"]["exact_match"] == 0.25
    scores = json.loads((project / "reports" / "eval_scores.json").read_text())
    assert [s["judge_score"] for s in scores] == [95, 30, None, 80]
    assert scores[0]["judge_attempts"] == 2 and scores[2]["judge_status"] == "unparseable"
    assert scores[2]["judge_reply"] == "The response is empty, so I give it 0."

    report = (project / "reports" / "eval.md").read_text()
    assert f"Judge: ollama model 'llama3' at {server.url}." in report
    assert "| evaluate | judge score, mean of 0–100 | 68.33 (3 scored) |" in report
    assert "| replies that are not an integer 0–100 (left out of the mean) | 1 |" in report
    assert "- #2: “The response is empty, so I give it 0.”" in report
    best = report.split("### Best 2 by judge score")[1].split("###")[0]
    assert best.index("| 0 | Name the author") < best.index("| 3 | Convert 3 kilometers")
    assert "| 1 | Rewrite" in report.split("### Worst 2 by judge score")[1]
    run = mlflow_run(project)
    assert run.data.metrics["judge.mean_score"] == pytest.approx(205 / 3)
    assert run.data.tags["judge"] == f"ollama model 'llama3' at {server.url}"


def test_an_unreachable_judge_fails_before_any_work(project: Path, caplog):
    set_params(project, judge="ollama", url="http://127.0.0.1:9")
    with pytest.raises(SystemExit):
        run_stage()
    assert "cannot reach the ollama judge at http://127.0.0.1:9" in caplog.text
    assert not (project / "metrics" / "eval.json").exists() and not (project / "reports").exists()
    assert not (project.parent / "mlflow.db").exists()  # no MLflow run was even started


def test_inputs_are_checked_before_any_work(project: Path, caplog):
    swapped = [RESPONSES[1], RESPONSES[0], *RESPONSES[2:]]
    write_json(project / "data" / "responses" / "instruct_test.json", swapped)
    with pytest.raises(SystemExit):
        run_stage()
    assert "record 0 does not match the test split (instruction, input, output differ)" in caplog.text
    write_json(project / "data" / "responses" / "instruct_test.json", RESPONSES[:3])
    with pytest.raises(SystemExit):
        run_stage()
    assert "holds 3 responses but the test split has 4 records" in caplog.text

    shutil.rmtree(project / "models" / "instruct")
    with pytest.raises(SystemExit):
        run_stage()
    assert "models/instruct/model.safetensors not found: run the instruct-finetune stage first" in caplog.text
    assert not (project / "metrics" / "eval.json").exists() and not (project / "reports").exists()


@pytest.mark.slow
def test_a_judge_run_killed_mid_way_resumes_asking_only_for_the_rest(project: Path):
    scores = {"Jane Austen": "95", "simile": "30", "mercury": "10", "kilometers": "80"}

    def answer(body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        return Reply(next(score for key, score in scores.items() if key in prompt))

    def stalls_after_two(body: dict):
        return answer(body) if len(first.chats) <= 2 else Slow(600, "0")  # the third request never returns

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1"}
    with FakeOllama(stalls_after_two) as first:
        set_params(project, judge="ollama", url=first.url, model="llama3", retries=0, timeout=600.0)
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "evaluate.py")], cwd=project, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 300
        while len(first.chats) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1].decode()
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    cache = project / "data" / "judge-cache.jsonl"
    assert len(cache.read_text().splitlines()) == 2  # the two verdicts it got survived the kill
    assert not (project / "metrics" / "eval.json").exists()

    with FakeOllama(answer) as second:
        set_params(project, url=second.url)  # another address of the same judge: the verdicts still count
        run_stage()
        asked = [c["messages"][0]["content"] for c in second.chats]
    assert len(asked) == 2 and "mercury" in asked[0] and "kilometers" in asked[1]  # only the rest
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["judge"] == {"judged": 4, "unparseable": 0, "failed": 0, "mean_score": 53.75}
    assert "cache" not in json.dumps(metrics)  # kept out of the metrics
    assert [s["judge_score"] for s in json.loads((project / "reports" / "eval_scores.json").read_text())] == [
        95, 30, 10, 80]  # fmt: skip


KEY = "sk-test-0123456789abcdef"


def outputs_text(work: Path) -> str:
    """Everything the stage wrote (metrics, reports) and logged to MLflow (params, tags, artifacts), as one text."""
    files = [work / "metrics" / "eval.json", work / "reports" / "eval.md", work / "reports" / "eval_scores.json"]
    text = "".join(p.read_text() for p in files if p.exists())
    store = work.parent / "mlflow.db"
    if store.exists():
        text += store.read_bytes().decode("utf-8", "replace")
        text += "".join(p.read_text(errors="replace") for p in work.parent.rglob("mlruns/**/*") if p.is_file())
    return text


def test_with_an_openai_compatible_judge(project: Path, caplog, monkeypatch: pytest.MonkeyPatch):
    """The book's prompt and options through POST /v1/chat/completions with the key from the environment; a 503
    is retried as with Ollama; the key is in no output, log, metric, param or tag."""
    def answer(body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        return Reply("95" if "Jane Austen" in prompt else "oops" if "mercury" in prompt else "40")

    monkeypatch.setenv("JUDGE_KEY", KEY)
    with FakeOpenAI(answer, script=[Status(503, "warming up")], key=KEY) as server:
        set_params(project, judge="openai", url=server.url, model="judge-model", api_key_env="JUDGE_KEY",
                   retries=2, backoff=0.0, timeout=10.0)  # fmt: skip
        run_stage()
        assert len(server.chats) == 5 and all(h["Authorization"] == f"Bearer {KEY}" for h in server.headers)
        first = server.chats[0]
        assert first["messages"] == [{"role": "user", "content": score_prompt(RESPONSES[0])}]
        assert (first["model"], first["seed"], first["temperature"], first["stream"]) == ("judge-model", 123, 0, False)

    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["judge"] == {"judged": 3, "unparseable": 1, "failed": 0, "mean_score": pytest.approx(175 / 3)}
    report = (project / "reports" / "eval.md").read_text()
    assert f"Judge: OpenAI-compatible model 'judge-model' at {server.url}." in report
    assert "(options: seed 123, temperature 0;" in report
    assert mlflow_run(project).data.params["evaluate.api_key_env"] == "JUDGE_KEY"
    assert KEY not in outputs_text(project) and KEY not in caplog.text


@pytest.mark.parametrize("key", [None, "sk-wrong-key-99999"])
def test_an_openai_judge_refusing_the_key_fails_before_any_work(project: Path, caplog, monkeypatch, key):
    """A server answering 401: one clear line naming the URL and the variable; no output, no MLflow run, no key."""
    if key is None:
        monkeypatch.delenv("JUDGE_KEY", raising=False)
    else:
        monkeypatch.setenv("JUDGE_KEY", key)
    with FakeOpenAI(key=KEY) as server:
        set_params(project, judge="openai", url=server.url, model="judge-model", api_key_env="JUDGE_KEY")
        with pytest.raises(SystemExit):
            run_stage()
        assert server.chats == []
    why = "$JUDGE_KEY is not set" if key is None else "the key in $JUDGE_KEY was refused"
    assert f"the judge at {server.url} answers HTTP 401 ({why}): set $JUDGE_KEY to an API key" in caplog.text
    assert not (project / "metrics" / "eval.json").exists() and not (project / "reports").exists()
    assert not (project.parent / "mlflow.db").exists()
    assert key is None or key not in caplog.text


def test_a_classifier_of_your_own_labels_in_the_report(project: Path):
    """metrics/cls.json of a 3-class classifier: its macro-F1 among the headlines, a per-class table and the
    confusion matrix in the report; no complaint about the positive-class F1 it does not have."""
    per_class = {"billing": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4},
                 "login": {"precision": 0.8, "recall": 1.0, "f1": 8 / 9, "support": 4},
                 "other | misc": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}  # fmt: skip
    write_json(project / "metrics" / "cls.json", {"test_accuracy": 0.8, "test_macro_f1": 0.85, "test_class": per_class})
    (project / "plots" / "cls_confusion.png").write_bytes(PNG)
    run_stage()
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["cls"] == {"test_accuracy": 0.8, "test_macro_f1": 0.85}
    report = (project / "reports" / "eval.md").read_text()
    assert "| lora-cls-finetune | classifier test macro-F1 | 0.850 |" in report
    assert "positive class" not in report and "test_f1" not in report
    assert "| billing | 1.000 | 0.500 | 0.667 | 4 |" in report and "| other \\| misc | 1.000 |" in report
    assert "![Classifier confusion matrix (test)](../plots/cls_confusion.png)" in report
