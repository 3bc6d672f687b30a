"""The Prefect flow (flows/pipeline.py) for real: one `prefect server start` on 127.0.0.1 for the module,
a tiny copy of the pipeline (git + DVC), run through the flow in this process, through a deployment
that a process worker picks up, and through the command line killed mid-pretrain; DVC's outputs and
MLflow's runs checked each time. Every process is started and stopped by PID, with bounded timeouts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from helpers import Server, free_port, prefect_client, prefect_settings, stop_group, write_tiny_params

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
SUMMARY = "pipeline-summary"
# The stages run here: evaluate and what it depends on (every stage of the pipeline). A stage added to
# dvc.yaml later joins once helpers.TINY_PIPELINE gives it tiny params (its defaults would take minutes).
TARGET = ["evaluate"]
STAGES = ["download", "tokenize", "sample-to-parquet", "pretrain", "load-gpt2", "lora-cls-finetune",
          "instruct-finetune", "evaluate"]  # fmt: skip
TRAINING = {"pretrain", "load-gpt2", "lora-cls-finetune", "instruct-finetune", "evaluate"}  # open MLflow runs
# The DAG of dvc.yaml as Prefect's flow-run graph should draw it: each task run's upstream task runs.
DAG = {"download": [], "tokenize": ["download"], "sample-to-parquet": ["tokenize"], "pretrain": ["sample-to-parquet"],
       "load-gpt2": ["pretrain"], "lora-cls-finetune": ["load-gpt2"], "instruct-finetune": ["load-gpt2"],
       "evaluate": ["instruct-finetune", "lora-cls-finetune"]}  # fmt: skip


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_module(prefect_server: Server) -> ModuleType:
    """flows/pipeline.py, imported once (it imports Prefect, which reads its settings then)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    spec = importlib.util.spec_from_file_location("scratchgpt_flow_pipeline", REPO / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Project:
    root: Path
    env: dict[str, str]  # for commands run in it (the venv's tools, the copy's code, the data mirror)

    def run(self, *args: str, timeout: float = 300, check: bool = True, env: dict | None = None):
        proc = subprocess.run(args, cwd=self.root, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror_dir: Path, prefect_server: Server) -> Project:
    """The pipeline with tiny params as its own git + DVC repository (committed), flows/ and prefect.yaml
    included. The flow runs in this process too, so its stages inherit os.environ: patched for the module."""
    root = tmp_path_factory.mktemp("flow") / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "prefect.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for name in ("stages", "src", "presets", "flows", "data/external"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_tiny_params(root)
    (root / "presets" / "flowtest.yaml").write_text("cls:\n  train:\n    lr: 0.001\n    nproc: 1\n")
    settings = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root / "src"),  # stages import the copy's code, which DVC hashes
        "SCRATCHGPT_MIRROR": str(mirror_dir),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }  # fmt: skip
    unset = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SCRATCHGPT_PROJECT_ROOT", "SCRATCHGPT_MLFLOW_PARENT_RUN_ID",
             "SCRATCHGPT_MLFLOW_EXPERIMENT", "SCRATCHGPT_TRACKING", "DVC_ROOT", "SCRATCHGPT_DEVICE",
             "SCRATCHGPT_PRECISION", "SCRATCHGPT_NPROC")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in unset and not k.startswith("PREFECT_")}
    project = Project(root, {**env, **settings, **prefect_server.env})
    project.run("git", "init", "-q")
    project.run("dvc", "init", "-q")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "project")
    with pytest.MonkeyPatch.context() as mp:
        for key in unset:
            mp.delenv(key, raising=False)
        for key, value in settings.items():
            mp.setenv(key, value)
        yield project


def run_flow(flow_module: ModuleType, server: Server, project: Project, **params):
    params.setdefault("stages", TARGET)
    with prefect_settings(server):
        return flow_module.pipeline(project_dir=str(project.root), return_state=True, **params)


def flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def summary_of(server: Server, run_id: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with prefect_client(server) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[SUMMARY]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))  # fmt: skip
    assert len(found) == 1, found
    return found[0].data


def logs_of(server: Server, run_id: str) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs, offset = [], 0
    with prefect_client(server) as client:
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                        offset=offset, sort=LogSort.TIMESTAMP_ASC):  # fmt: skip
            logs += batch
            offset += len(batch)
    return logs


def mlflow_runs(project: Project):
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("scratchgpt")
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def parent_of(project: Project, prefect_run_id: str):
    (parent,) = [r for r in mlflow_runs(project)  # the stage runs carry the flow run's id too
                 if r.data.tags.get("prefect_flow_run_id") == prefect_run_id and "pipeline" in r.data.tags]  # fmt: skip
    children = [r for r in mlflow_runs(project) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def task_graph(server: Server, run_id: str, expected: set[str]) -> dict[str, list[str]]:
    """{task run name: the names of its upstream task runs} of a flow run, as Prefect's API records them
    (`task_inputs`: what the UI's flow-run graph draws), once the `expected` task runs are there (the flow's
    process reports them as events, which the server records a moment later)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with prefect_client(server) as client:
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            if {t.name for t in tasks} >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    names = {t.id: t.name for t in tasks}
    return {t.name: sorted(names[i.id] for inputs in t.task_inputs.values() for i in inputs
                           if i.input_type == "task_run") for t in tasks}  # fmt: skip


def rows(summary: str) -> dict[str, str]:
    """{stage: state} from the summary's table."""
    return {m[1]: m[2] for m in re.finditer(r"^\| ([\w-]+) \| ([\w ]+) \|", summary, re.M) if m[1] != "stage"}


@pytest.fixture(scope="module")
def first_run(flow_module, prefect_server: Server, project: Project):
    """The whole tiny pipeline through the flow, once; the pretrained weights it made, kept aside."""
    start = time.monotonic()
    state = run_flow(flow_module, prefect_server, project)
    took = time.monotonic() - start
    weights = project.root.parent / "first_run_model.safetensors"
    if state.is_completed():
        shutil.copy(project.root / "models" / "pretrain" / "model.safetensors", weights)
    return state, weights, took


# --- the flow in this process -----------------------------------------------------------------------


def test_bad_overrides_and_stages_are_refused_before_any_stage_runs(flow_module, prefect_server, project):
    before = (project.root / "params.yaml").read_bytes()
    for params, message in [
        ({"overrides": {"pretrain.train.learning_rate": 1e-3}}, "override pretrain.train.learning_rate: no such key"),
        ({"overrides": {"pretrain.train.lr": -1.0}}, "pretrain.train: lr must be a positive number"),
        ({"device": "tpu"}, "device must be one of"),
        ({"preset": "nosuch"}, "no preset 'nosuch'"),
    ]:
        state = run_flow(flow_module, prefect_server, project, **params)
        assert state.is_failed() and message in state.message, state.message
        with prefect_client(prefect_server) as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])))
        assert tasks == []  # not one stage ran
    assert (project.root / "params.yaml").read_bytes() == before
    assert not (project.root / "dvc.lock").exists()
    assert [p.name for p in (project.root / "data").iterdir()] == ["external"]  # the user's files only

    # the command line refuses them before a flow run exists (exit 2, one line)
    for args, message in [(["--set", "cls.mode=lora", "--set", "cls.moed=full"], "did you mean cls.mode"),
                          (["--stages", "pretrian"], "unknown stage(s) ['pretrian']")]:  # fmt: skip
        proc = project.run(sys.executable, "flows/pipeline.py", *args, check=False, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_an_unreachable_tracking_store_fails_the_flow_before_its_first_task(flow_module, prefect_server, project,
                                                                            monkeypatch):  # fmt: skip
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    state = run_flow(flow_module, prefect_server, project)
    assert state.is_failed() and f"MLflow tracking store {url} is not reachable" in state.message, state.message
    assert "SCRATCHGPT_TRACKING=0" in state.message
    with prefect_client(prefect_server) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        assert client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))) == []
    assert not (project.root / "dvc.lock").exists()
    assert [p.name for p in (project.root / "data").iterdir()] == ["external"]  # your own data's folder, only
    # the command line: one line, exit 2, before a flow run exists
    proc = project.run(sys.executable, "flows/pipeline.py", check=False, timeout=120, env={"MLFLOW_TRACKING_URI": url})
    assert proc.returncode == 2 and f"error: MLflow tracking store {url} is not reachable" in proc.stderr, proc.stderr


def test_the_pipeline_runs_end_to_end_then_a_rerun_skips_every_stage(first_run, flow_module, prefect_server, project):
    state, _, took = first_run
    assert state.is_completed(), state.message
    root = project.root
    for path in ("models/pretrain/model.safetensors", "models/base/model.safetensors",
                 "models/spam-classifier/model.safetensors", "metrics/cls.json", "models/instruct/model.safetensors",
                 "reports/eval.md", "metrics/eval.json", "dvc.lock"):  # fmt: skip
        assert (root / path).is_file(), path
    stages = [r["stage"] for r in state.result()]
    assert stages == STAGES
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == set(stages)
    assert "Data and pipelines are up to date" in project.run("dvc", "status", *TARGET, "--with-deps").stdout

    summary = summary_of(prefect_server, flow_run_id(state))
    assert rows(summary) == {s: "ran" for s in stages}, summary
    assert "test_accuracy" in summary and "val_loss" in summary

    parent, children = parent_of(project, flow_run_id(state))
    head = project.run("git", "rev-parse", "HEAD").stdout.strip()
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["git_commit"], parent.data.tags["preset"], parent.data.tags["pipeline"]) == (
        head, "cpu", "pipeline")  # fmt: skip
    assert {c.data.tags["dvc_stage"] for c in children} == TRAINING
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.info.run_id in summary for c in children)  # the summary names each stage's run

    # nothing changed: DVC skips every stage, the summary says so, MLflow gets a parent and no stage run
    n_runs = len(mlflow_runs(project))
    start = time.monotonic()
    again = run_flow(flow_module, prefect_server, project)
    rerun_took = time.monotonic() - start
    assert again.is_completed(), again.message
    assert [r["state"] for r in again.result()] == ["skipped"] * len(stages)
    assert rows(summary_of(prefect_server, flow_run_id(again))) == {s: "skipped" for s in stages}
    parent, children = parent_of(project, flow_run_id(again))
    assert children == [] and len(mlflow_runs(project)) == n_runs + 1
    assert parent.data.tags["skipped_stages"] == ",".join(stages)
    print(f"first flow run {took:.1f} s, rerun with every stage skipped {rerun_took:.1f} s")


def test_the_flow_runs_graph_is_the_dag_and_its_mlflow_runs_say_what_they_are(first_run, prefect_server, project):
    state = first_run[0]
    assert state.is_completed(), state.message
    run_id = flow_run_id(state)
    assert task_graph(prefect_server, run_id, set(DAG)) == DAG

    from mlflow import MlflowClient

    exp = MlflowClient(project.mlflow_uri).get_experiment_by_name("scratchgpt")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI opens it on the runs
    parent, children = parent_of(project, run_id)
    names = {c.data.tags["dvc_stage"]: c.info.run_name for c in children}
    assert re.fullmatch(r"pretrain · cpu-small \d+\.\dM · preset cpu", names.pop("pretrain")), names
    assert names == {"load-gpt2": "load-gpt2 · base pretrain",
                     "lora-cls-finetune": "lora-cls-finetune · last-block · preset cpu",
                     "instruct-finetune": "instruct-finetune · full · preset cpu",
                     "evaluate": "evaluate · no judge"}  # fmt: skip
    page = f"{prefect_server.url.removesuffix('/api')}/runs/flow-run/{run_id}"  # the flow run in Prefect's UI
    for run in (parent, *children):
        assert (run.data.tags["prefect_flow_run_url"], run.data.tags["prefect_flow_run_id"]) == (page, run_id)
    # a local store has no UI to link to: the summary names the runs
    assert f"| {children[0].info.run_id} |" in summary_of(prefect_server, run_id)


def test_a_stage_run_whose_process_died_is_marked_failed(flow_module, tmp_path):
    """A stage process killed outright (SIGKILL, out of memory) leaves its MLflow run RUNNING; the flow's
    report, when every stage has ended, marks it FAILED."""
    from mlflow import MlflowClient

    from scratchgpt.plumbing import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.pipeline_run("pipeline", {}, tracking_uri=uri) as parent:
        client = MlflowClient(uri)
        lost = client.create_run(parent.experiment_id, tags={"mlflow.parentRunId": parent.run_id, "dvc_stage": "x"})
        done = client.create_run(parent.experiment_id, tags={"mlflow.parentRunId": parent.run_id, "dvc_stage": "y"})
        client.set_terminated(done.info.run_id, "FINISHED")
        assert flow_module._child_runs(parent) == {"x": lost.info.run_id, "y": done.info.run_id}
    got = client.get_run(lost.info.run_id)
    assert got.info.status == "FAILED" and "ended without ending its run" in got.data.tags["error"]
    assert client.get_run(done.info.run_id).info.status == "FINISHED"


# --- a deployment on a process work pool ------------------------------------------------------------


def _flow_run_uuid(output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def test_deployment_runs_on_a_process_worker_one_run_at_a_time(first_run, prefect_server, project, tmp_path):
    """Deploy `cpu` from prefect.yaml, trigger two runs at once (the second's last stage fails), let one
    `prefect worker start --run-once` run both; the checkout lock makes them take turns."""
    assert first_run[0].is_completed()
    before = workspace(project)
    project.run(PREFECT, "work-pool", "create", "cpu", "--type", "process", timeout=120)
    deployed = project.run(PREFECT, "--no-prompt", "deploy", "--name", "pipeline/cpu", timeout=120)
    assert "pipeline/cpu" in deployed.stdout, deployed.stdout[-2000:]
    # good: a DVC experiment (a preset, and an override that wins over it) that retrains the classifier as two
    # torchrun processes, with a job variable merged into the deployment's. bad: texts longer than the context.
    good = _flow_run_uuid(project.run(
        PREFECT, "deployment", "run", "pipeline/cpu", "--param", f"stages={json.dumps(TARGET)}", "--param",
        "preset=flowtest", "--param", 'overrides={"cls.train.nproc": 2}',
        "--job-variable", 'env={"SCRATCHGPT_PRECISION": "fp32"}', timeout=120).stdout)  # fmt: skip
    bad = _flow_run_uuid(project.run(
        PREFECT, "deployment", "run", "pipeline/cpu", "--param", f"stages={json.dumps(TARGET)}",
        "--param", 'overrides={"cls.max_length": 4096}',
        timeout=120).stdout)  # fmt: skip
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--run-once"], cwd=tmp_path,
                                  env=project.env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        worker.wait(timeout=480)
    finally:
        stop_group(worker)
    worker_log = (tmp_path / "worker.log").read_text()

    with prefect_client(prefect_server) as client:
        good_run, bad_run = client.read_flow_run(good), client.read_flow_run(bad)
    assert good_run.state.is_completed(), f"{good_run.state.message}\n{worker_log[-4000:]}"
    assert bad_run.state.is_failed(), worker_log[-4000:]
    assert "stage 'lora-cls-finetune' failed" in bad_run.state.message
    assert "exceeds the base model's context length" in bad_run.state.message
    bad_rows = rows(summary_of(prefect_server, bad))
    assert bad_rows["lora-cls-finetune"] == "failed" and bad_rows["download"] == "skipped"

    # one at a time: the runs' spells holding the checkout lock do not overlap; the later one waited
    spells = {}
    for run_id in (good, bad):
        logs = logs_of(prefect_server, run_id)
        held = [log.timestamp for log in logs if log.message.startswith("holding the checkout lock")]
        freed = [log.timestamp for log in logs if log.message.startswith("releasing the checkout lock")]
        assert len(held) == len(freed) == 1, [log.message for log in logs][-20:]
        spells[run_id] = (held[0], freed[0], any("waiting" in log.message for log in logs))
    first, second = sorted(spells.values())
    assert first[1] <= second[0]
    started = max(good_run.start_time, bad_run.start_time)
    if started < first[1]:
        assert second[2], "the run that started while the other held the lock did not say it waited"

    # MLflow: the good run's parent and, nested under it, the one stage run it made: two processes
    parent, children = parent_of(project, good)
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect_deployment"] == "cpu"
    # the deployment's job variables (nproc) and the run's (precision) both reached the flow
    assert (parent.data.params["nproc"], parent.data.params["precision"]) == ("1", "fp32")
    assert parent.data.params["preset_file"] == "flowtest"
    # the classifier retrained; evaluate reran as it reports the classifier's metrics; instruct-finetune did not
    runs = {c.data.tags["dvc_stage"]: c for c in children}
    assert sorted(runs) == ["evaluate", "lora-cls-finetune"], sorted(runs)
    cls_run = runs["lora-cls-finetune"]
    assert cls_run.info.status == "FINISHED" and cls_run.data.params["cls.train.lr"] == "0.001"
    assert cls_run.data.params["runtime.world_size"] == "2"
    assert rows(summary_of(prefect_server, good))["pretrain"] == "skipped"
    # the graph: the stages' DAG, and saving the experiment after the last stage (not after each, as before)
    assert task_graph(prefect_server, good, {*DAG, "save-experiment"}) == {**DAG, "save-experiment": ["evaluate"]}
    assert parent_of(project, bad)[0].info.status == "FAILED"

    # DVC: the good run is an experiment with its params, and the workspace is the baseline's
    # again after both runs: params.yaml, dvc.lock, the metrics and models, `dvc status`
    experiment = parent.data.tags["dvc_exp_name"]
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    exps = {e["name"]: e["revs"][0]["data"] for b in shown for e in b.get("experiments") or []}
    assert exps[experiment]["params"]["params.yaml"]["data"]["cls"]["train"]["lr"] == 0.001  # the preset's
    assert workspace(project) == before


def workspace(project: Project) -> dict:
    """What a flow run with overrides must leave as it found it."""
    root = project.root
    return {"git": project.run("git", "status", "--porcelain").stdout,
            "dvc": json.loads(project.run("dvc", "status", "--json").stdout),
            **{p: (root / p).read_text() for p in ("params.yaml", "dvc.lock")},
            "cls": (root / "metrics" / "cls.json").read_text(),
            "models": {p.name: p.stat().st_size for p in (root / "models").rglob("*") if p.is_file()}}  # fmt: skip


# --- killed mid-pretrain, run again -----------------------------------------------------------------


@pytest.mark.heavy
def test_a_run_killed_mid_pretrain_resumes_to_the_weights_of_an_uninterrupted_run(first_run, project, tmp_path):
    """`python flows/pipeline.py`, SIGKILLed (its whole process group: flow, dvc, stage) between two
    checkpoints of pretrain; the next run resumes there and ends with the first run's weights, bit for bit."""
    state, reference, _ = first_run
    assert state.is_completed()
    project.run("git", "checkout", "-q", "params.yaml")
    shutil.rmtree(project.root / "models" / "pretrain")  # the next run trains the first run's model again
    config = project.root / "models" / "pretrain" / "config.json"
    cmd = [sys.executable, "flows/pipeline.py", "--stages", "pretrain"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=project.root, env=project.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        step = None
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                ckpt = json.loads(config.read_text())["checkpoint"]
                if ckpt["step"] >= 5 and not ckpt["finished"]:
                    step = ckpt["step"]
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)
    assert step is not None, f"no unfinished checkpoint seen\n{(tmp_path / 'killed.log').read_text()[-4000:]}"

    proc = project.run(*cmd, timeout=300)
    out = proc.stdout + proc.stderr
    assert re.search(r"resuming from models/pretrain: step \d+ of 18", out), out[-4000:]
    assert (project.root / "models" / "pretrain" / "model.safetensors").read_bytes() == reference.read_bytes()
