"""Your own data, declared in params.yaml alone, through the whole pipeline under real DVC and MLflow.

One project (module scope) follows docs/own-data.md's walk-through (its params.yaml block, read from the page)
and gets, in data/external/: a 4-class labelled CSV with easy cues (each text ends in one of its class's phrases;
columns `body` and `queue`, class names with a space and an ampersand) and a given test file, a JSONL
instruction set with other field names and a given test file, and a corpus given as a glob plus a JSONL text
column. Its params.yaml names them (no code or dvc.yaml edit) and the Prefect flow runs the pipeline: the tiny
pretraining of tests/helpers.py, and the CPU preset's classifier settings but a 6x learning rate (on the tiny base,
5 epochs at 5e-4 reach a macro-F1 of 0.65 on its test file, at 2e-3 0.94, at 3e-3 1.0). Then:
- the classifier, `python -m scratchgpt.classify`, the registered model and `mlflow models serve` answer with
  the four class names; macro-F1 on the test file >= 0.9; metrics, report and comparison show the classes;
- editing one row of the CSV reruns tokenize and what its output feeds, nothing upstream, and the new row is in
  the data (no stale result);
- data that is not the book's cannot be registered under the book's name.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import deep_update, free_port, stop_group, wait_healthy, write_tiny_params
from test_serving import post

from scratchgpt.data.datasets import read_label_info

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # the module fixture runs the whole pipeline

CLASSES = {  # class name -> cue phrases (every text of the class holds one)
    "billing": ["my invoice shows a double charge", "the payment was taken twice", "why is my bill so high"],
    "login": ["I cannot sign in to my account", "the password reset link fails", "my account is locked"],
    "shipping": ["my package has not arrived", "the delivery is late again", "the tracking number is wrong"],
    "returns & refunds": ["I want my money back", "how do I return this item", "please refund my order"],
}
OPENERS = ["Hello,", "Hi team,", "Good morning.", "Dear support,", "Hey,", "Urgent:", "Sorry to bother you, but", ""]
QUESTIONS = [("Name a primary color.", "", "Red."), ("What is 2 plus 2?", "", "4."),
             ("Translate to French.", "Good morning", "Bonjour."), ("Give the opposite of hot.", "", "Cold."),
             ("Say hello.", "", "Hello."), ("Spell cat backwards.", "cat", "tac.")]  # fmt: skip


def ticket(rng: random.Random, label: str) -> str:
    return " ".join(p for p in (rng.choice(OPENERS), rng.choice(CLASSES[label])) if p)


def write_tickets(path: Path, rows_per_class: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    rows = [(ticket(rng, label), label) for label, n in rows_per_class.items() for _ in range(n)]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body", "queue"])
        writer.writerows((i, body, label) for i, (body, label) in enumerate(rows))


def write_support(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        question, context, answer = rng.choice(QUESTIONS)
        record = {"question": question, "answer": answer, "id": i}
        if context:  # records without a context field have no input
            record["context"] = context
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_own_data(root: Path, mirror_dir: Path) -> None:
    """The user's files, as they would drop them into data/external/."""
    ext = root / "data" / "external"
    write_tickets(ext / "tickets" / "train.csv", {"billing": 30, "login": 27, "shipping": 25, "returns & refunds": 22},
                  seed=1)  # fmt: skip
    write_tickets(ext / "tickets" / "test.csv", dict.fromkeys(CLASSES, 8), seed=2)
    write_support(ext / "support.jsonl", 48, seed=3)
    write_support(ext / "support-test.jsonl", 6, seed=4)
    story = (mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")
    third = len(story) // 3
    for i in range(3):
        (ext / "corpus" / f"part{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (ext / "corpus" / f"part{i}.txt").write_text(story[i * third : (i + 1) * third], encoding="utf-8")
    notes = [{"content": ticket(random.Random(i), label)} for i, label in enumerate(CLASSES)]
    (ext / "corpus-notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes), encoding="utf-8")


def walkthrough_params() -> dict:
    """The params.yaml block of docs/own-data.md's walk-through, as the user copies it."""
    doc = (REPO / "docs" / "own-data.md").read_text(encoding="utf-8")
    block = doc.split("<!-- own-data params -->", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(textwrap.dedent(block))


OWN_PARAMS = {
    "tokenize": {
        "corpus": ["data/external/corpus/*.txt", {"path": "data/external/corpus-notes.jsonl", "column": "content"}],
        "instruct": {"path": "data/external/support.jsonl", "format": "auto",
                     "fields": {"instruction": "question", "input": "context", "output": "answer"},
                     "test_path": "data/external/support-test.jsonl"},
    },
    # the CPU preset's classifier (params.yaml) but lr 3e-3, on the tiny base of TINY_PIPELINE
    "cls": {"mode": "full", "train": {"epochs": 5, "batch_size": 8, "lr": 3.0e-3, "eval_freq": 50, "eval_iter": 5,
                                      "final_eval_iter": None, "checkpoint_every": 100}},
}  # fmt: skip
NAMES = set(CLASSES)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mirror_dir: Path):
    """The project with the user's files and params, the whole pipeline run by the Prefect flow (on a temporary
    local Prefect server; each stage a `dvc repro --single-item`), committed."""
    from conftest import make_dvc_project

    root = tmp_path_factory.mktemp("own_data")
    project = make_dvc_project(root / "project", mirror_dir, f"sqlite:///{root / 'mlflow.db'}")
    shutil.copytree(REPO / "flows", project.path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    write_own_data(project.path, mirror_dir)
    walkthrough = walkthrough_params()
    assert walkthrough["cls"] == {"name": "ticket-router", "class_weights": "balanced"}
    write_tiny_params(project.path, deep_update(walkthrough, OWN_PARAMS))
    env = {**project.env, "PREFECT_HOME": str(root / "prefect"), "TQDM_DISABLE": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # its own temporary server
    flow = subprocess.run([sys.executable, "flows/pipeline.py", "--project", "."], cwd=project.path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-5000:]
    stages = ("download", "tokenize", "sample-to-parquet", "pretrain", "load-gpt2", "lora-cls-finetune",
              "instruct-finetune", "evaluate")  # fmt: skip
    assert f"pipeline completed: {', '.join(f'{s} ran' for s in stages)}" in flow.stdout + flow.stderr
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "own data reproduced")
    return project


def test_the_data_stages_read_the_declared_files(project) -> None:
    root = project.path
    tokenize = json.loads((root / "metrics" / "tokenize.json").read_text())
    assert "spam" not in tokenize and tokenize["documents"] == 3 + 4  # three text files, four JSONL rows
    assert tokenize["cls"]["labels"] == {"billing": 30, "login": 27, "returns & refunds": 22, "shipping": 25}
    assert (tokenize["cls"]["rows"], tokenize["cls"]["test_rows"], tokenize["cls"]["classes"]) == (104, 32, 4)
    assert (tokenize["instruct"]["records"], tokenize["instruct"]["test_records"]) == (48, 6)
    sample = json.loads((root / "metrics" / "sample.json").read_text())
    assert sample["cls"] == {"train": 89, "val": 15, "test": 32}
    # the given test files; the rest in proportion to the ratios: instructions 85:5, labelled texts 70:10
    assert sample["instruct"] == {"train": 45, "val": 3, "test": 6}
    val = pq.read_table(root / "data" / "processed" / "cls" / "val.parquet")
    counts = {n: val.column("label").to_pylist().count(i) for i, n in enumerate(sorted(NAMES))}
    assert counts == {"billing": 4, "login": 4, "returns & refunds": 3, "shipping": 4}  # stratified: 1/8 each
    info = read_label_info(root / "data" / "processed" / "cls" / "train.parquet")
    assert info.labels == tuple(sorted(NAMES)) and info.source == "data/external/tickets/train.csv"


def test_the_classifier_learns_the_four_classes_under_its_own_name(project) -> None:
    root = project.path
    metrics = json.loads((root / "metrics" / "cls.json").read_text())
    assert metrics["test_macro_f1"] >= 0.9, metrics
    assert set(metrics["test_class"]) == NAMES and "test_f1" not in metrics
    assert sum(c["support"] for c in metrics["test_class"].values()) == 32
    config = json.loads((root / "models" / "ticket-router" / "config.json").read_text())
    assert set(config["classifier"]["labels"]) == NAMES
    assert not (root / "models" / "spam-classifier").exists()
    assert (root / "models" / "ticket-router-ckpt").is_dir() and (root / "plots" / "cls_confusion.png").is_file()
    report = (root / "reports" / "eval.md").read_text()
    assert "| lora-cls-finetune | classifier test macro-F1 |" in report and "| returns &amp; refunds |" in report
    assert "spam" not in report.lower().split("## test responses")[0]


def test_classify_answers_with_the_four_names(project) -> None:
    texts = ["Hi, my invoice shows a double charge", "Since Monday I cannot sign in to my account"]
    out = subprocess.run([sys.executable, "-m", "scratchgpt.classify", "--probabilities", *texts], cwd=project.path,
                         env=project.env, capture_output=True, text=True, timeout=120)  # models/<cls.name>  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [fields[0] for fields in lines] == ["billing", "login"]
    assert all({f.split("=")[0] for f in fields[2:6]} == NAMES for fields in lines)


def test_the_registered_model_is_served_with_the_four_names(project, tmp_path: Path) -> None:
    uri = project.env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    assert [m.name for m in client.search_registered_models()] == ["instruct", "ticket-router"]
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/ticket-router/1",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, timeout=120)
        texts = [[ticket(random.Random(9), label)] for label in sorted(NAMES)]
        status, body = post(port, {"dataframe_split": {"columns": ["text"], "data": texts}})
        assert status == 200, body
        assert [p["label"] for p in body["predictions"]] == sorted(NAMES)
        assert set(body["predictions"][0]) == {"label", "probability"}
        status, body = post(port, {"dataframe_split": {"columns": ["text"], "data": texts[:1]},
                                   "params": {"probabilities": True}})  # fmt: skip
        assert status == 200, body
        every = body["predictions"][0]["probabilities"]
        assert set(every) == NAMES and sum(every.values()) == pytest.approx(1.0, abs=1e-5)
    finally:
        stop_group(proc)


def test_the_comparison_shows_each_class(project) -> None:
    out = subprocess.run([sys.executable, "-m", "scratchgpt.compare", "--no-log", "--out", "reports/compare"],
                         cwd=project.path, env=project.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    table = (project.path / "reports" / "compare" / "comparison.md").read_text()
    assert "cls.test_macro_f1" in table and all(f"cls.f1[{name}]" in table for name in ("billing", "login"))


def test_the_books_name_is_refused_for_your_data(project) -> None:
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    params["cls"]["name"] = "spam-classifier"
    (project.path / "book-name.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "stages/lora_cls_finetune.py", "--params", "book-name.yaml"],
                         cwd=project.path, env=project.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    (project.path / "book-name.yaml").unlink()
    assert out.returncode == 1
    assert "cls.name is 'spam-classifier', the book's SMS spam model, but the data is your own" in out.stderr
    assert not (project.path / "models" / "spam-classifier").exists()


@pytest.mark.heavy
def test_editing_one_row_reruns_from_the_stage_that_reads_it(project) -> None:
    """Run last: it changes the project."""
    path = project.path / "data" / "external" / "tickets" / "train.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[5] = '5,"Edited: the payment was taken twice",billing'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status = project.run("dvc", "status")
    assert "tokenize:" in status and "modified:           data/external" in status
    out = project.run("dvc", "repro", timeout=600)
    ran = {s for s in ("download", "tokenize", "sample-to-parquet", "pretrain", "load-gpt2", "lora-cls-finetune",
                       "instruct-finetune", "evaluate") if f"Running stage '{s}'" in out}  # fmt: skip
    assert ran == {"tokenize", "sample-to-parquet", "lora-cls-finetune", "evaluate"}, out
    texts = pq.read_table(project.path / "data" / "interim" / "cls.parquet").column("text").to_pylist()
    assert "Edited: the payment was taken twice" in texts
    assert "Data and pipelines are up to date" in project.run("dvc", "status")
