"""The registering stages (lora-cls-finetune, instruct-finetune) as DVC experiments outside the workspace, with
the project's default MLflow store: `dvc exp run --temp`, and two `dvc exp run --queue` experiments run by
`dvc queue start --jobs 2`. Each experiment's run and registered model version land in `<project>/mlflow.db`,
not in the temporary copy under .dvc/tmp/exps.

The DVC tests share one tiny project (the two registering stages and what they need, reproduced once and
committed; MLFLOW_TRACKING_URI unset, so the stages use the project's store as a user's clone does).
"""

from __future__ import annotations

import json
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
        assert sorted((r.data.tags["dvc_stage"], r.info.status) for r in runs) == [(s, "FINISHED") for s in stages]
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
