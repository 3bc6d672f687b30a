"""The registering stages (lora-cls-finetune, instruct-finetune) as DVC experiments outside the workspace, with
the project's default MLflow store: `dvc exp run --temp`, and two `dvc exp run --queue` experiments run by
`dvc queue start --jobs 2`. Each experiment's run and registered model version land in `<project>/mlflow.db`,
not in the temporary copy under .dvc/tmp/exps. Also: processes writing to one new SQLite store at the same
moment all succeed.

The DVC tests share one tiny project (the two registering stages and what they need, reproduced once and
committed; MLFLOW_TRACKING_URI unset, so the stages use the project's store as a user's clone does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import write_tiny_params

CLS, INSTRUCT = "lora-cls-finetune", "instruct-finetune"
# stage -> (registered model, metrics file, the param an experiment changes: its seed, so the stage reruns)
STAGES = {
    CLS: ("spam-classifier", "metrics/cls.json", "cls.train.seed"),
    INSTRUCT: ("instruct", "metrics/instruct.json", "instruct.train.seed"),
}
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SCRATCHGPT_PROJECT_ROOT", "SCRATCHGPT_MLFLOW_EXPERIMENT")


def project_client(project_dir: Path):
    """A client of the project's own store, `<project>/mlflow.db`, for runs and registry alike."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project_dir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def project(module_dvc_project):
    """The tiny pipeline's two registering stages (and their upstream) reproduced and committed, tracking to the
    project's default store (no MLflow URI in the environment)."""
    project = module_dvc_project
    for name in MLFLOW_ENV:
        project.env.pop(name, None)
    write_tiny_params(project.path)
    project.run("dvc", "repro", CLS, INSTRUCT, timeout=900)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny pipeline up to the registering stages")
    client = project_client(project.path)
    assert {m.name for m in client.search_registered_models()} == {"spam-classifier", "instruct"}
    return project


def exp_run_args(name: str, stages: tuple[str, ...]) -> list[str]:
    """`-n NAME`, a changed seed per stage (so DVC reruns it) and the stages, for `dvc exp run`."""
    return ["-n", name, *(a for stage in stages for a in ("-S", f"{STAGES[stage][2]}=7")), *stages]


def assert_registered_in_project_store(project, experiments: dict[str, tuple[str, ...]]) -> None:
    """For each DVC experiment (name -> its stages), per stage: one FINISHED run in the project's store, tagged
    with the experiment, its artifacts in `<project>/mlruns`, one registered model version from that run, and
    the experiment's metrics and changed param in `dvc exp show`."""
    client = project_client(project.path)
    exp = client.get_experiment_by_name("scratchgpt")
    show = json.loads(project.run("dvc", "exp", "show", "--json", stdout_only=True))
    revs = {e["name"]: e["revs"][0] for b in show for e in b.get("experiments") or []}
    for name, stages in experiments.items():
        runs = client.search_runs([exp.experiment_id], f"tags.dvc_exp_name = '{name}'")
        done = sorted((r.data.tags["dvc_stage"], r.info.status) for r in runs)
        assert done == [(stage, "FINISHED") for stage in sorted(stages)], name
        for run in runs:
            model, metrics_file, param = STAGES[run.data.tags["dvc_stage"]]
            assert run.info.artifact_uri.startswith((project.path / "mlruns").as_uri()), run.info.artifact_uri
            versions = client.search_model_versions(f"name='{model}' and run_id='{run.info.run_id}'")
            assert [v.status for v in versions] == ["READY"], (name, model, versions)
            assert run.data.params[param] == "7"

            data = revs[name]["data"]
            assert data["metrics"][metrics_file]["data"], name
            section, *keys = param.split(".")
            value = data["params"]["params.yaml"]["data"][section]
            for key in keys:
                value = value[key]
            assert value == 7, (name, value)


@pytest.mark.slow
def test_temp_experiment_registers_both_models_in_the_project_store(project):
    project.run("dvc", "exp", "run", "--temp", *exp_run_args("temp", (CLS, INSTRUCT)), timeout=600)
    assert_registered_in_project_store(project, {"temp": (CLS, INSTRUCT)})


@pytest.mark.slow
@pytest.mark.heavy
def test_two_queued_experiments_run_at_once_and_register_in_the_project_store(project):
    experiments = {"queued-cls": (CLS,), "queued-instruct": (INSTRUCT,)}
    for name, stages in experiments.items():
        project.run("dvc", "exp", "run", "--queue", *exp_run_args(name, stages))
    project.run("dvc", "queue", "start", "--jobs", "2")
    deadline = time.monotonic() + 600
    while True:
        time.sleep(5)  # each `dvc queue status` costs a second of CPU, taken from the experiments
        status = project.run("dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
    for name in experiments:
        line = next((line for line in status.splitlines() if name in line), "")
        assert "Success" in line, f"{name}:\n{status}\n{project.run('dvc', 'queue', 'logs', name)[-5000:]}"
    assert_registered_in_project_store(project, experiments)


# --- one SQLite store, several writers at the same moment ---------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    barrier, n, model_dir = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from scratchgpt.apps import serving
    from scratchgpt.plumbing import tracking
    (barrier / f"ready-{os.getpid()}").touch()  # all imports done: start together, at the first touch of the store
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < n:
        assert time.monotonic() < deadline, "the other writers never got ready"
        time.sleep(0.002)
    with tracking.stage_run("lora-cls-finetune", {"cls": {"mode": "full"}}) as run:
        version = serving.log_classifier(run, model_dir, {"test_accuracy": 0.5})
    print(run.run_id, version.version)
    """
)


@pytest.mark.slow
def test_writers_creating_and_registering_into_one_sqlite_store_at_once_all_succeed(tmp_path, mirror_dir):
    """Two stage processes start at the same moment on a store that does not exist yet (both create it), log
    their runs and register the same model: both finish, as versions 1 and 2."""
    from scratchgpt.apps.classify import ClassifierInfo, attach_head, save_classifier
    from scratchgpt.nn.model import GPTConfig, GPTModel

    tiny = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
    model_dir = tmp_path / "spam-classifier"
    save_classifier(attach_head(GPTModel(tiny), 2), model_dir, ClassifierInfo(("ham", "spam"), "last-token", 64, None),
                    vocab_dir=mirror_dir)  # fmt: skip
    (tmp_path / "barrier").mkdir()
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in (*MLFLOW_ENV, "DVC_ROOT", "MLFLOW_RUN_ID")}
    env["SCRATCHGPT_PROJECT_ROOT"] = str(store)
    n = 2
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "barrier"), str(n), str(model_dir)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-5000:]
    results = [out.split() for out, _ in outs]
    client = project_client(store)
    versions = {str(v.version): v.run_id for v in client.search_model_versions("name='spam-classifier'")}
    assert versions == {v: r for r, v in results} and sorted(versions) == ["1", "2"]
    assert all(client.get_run(r).info.status == "FINISHED" for r, _ in results)
