"""A real `mlflow server` (SQLite backend, local artifact destination served over HTTP) on 127.0.0.1:
the tiny pipeline's `dvc repro` with `MLFLOW_TRACKING_URI=http://...` lands its stage runs there."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytestmark = pytest.mark.slow

TRACKED = {"pretrain", "load-gpt2", "lora-cls-finetune", "instruct-finetune", "evaluate"}


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url)


def _runs(client) -> dict:
    exp = client.get_experiment_by_name("scratchgpt")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return {r.data.tags["dvc_stage"]: r for r in runs}


def test_every_tracked_stage_lands_on_the_server(tiny_pipeline, mlflow_server, client) -> None:
    root = tiny_pipeline.path
    runs = _runs(client)
    assert set(runs) == TRACKED and {r.info.status for r in runs.values()} == {"FINISHED"}
    pretrain = runs["pretrain"]
    assert pretrain.data.params["pretrain.train.epochs"] == "2"
    metrics = json.loads((root / "metrics" / "pretrain.json").read_text())
    assert pretrain.data.metrics["final_val_loss"] == pytest.approx(metrics["val_loss"])
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()  # nothing stored locally
    with sqlite3.connect(mlflow_server.db) as db:  # the server's database holds the runs
        stored = {row[0] for row in db.execute("SELECT run_uuid FROM runs")}
    assert {r.info.run_id for r in runs.values()} <= stored


def test_artifacts_go_through_the_server_to_its_destination(tiny_pipeline, mlflow_server, client) -> None:
    exp = client.get_experiment_by_name("scratchgpt")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's choice, no local path forced
    pretrain = _runs(client)["pretrain"]
    listed = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"pretrain_loss.png", "pretrain.json", "config.json", "params.json"} <= listed
    png = mlflow_server.artifacts / exp.experiment_id / pretrain.info.run_id / "artifacts" / "pretrain_loss.png"
    assert png.read_bytes() == (tiny_pipeline.path / "plots" / "pretrain_loss.png").read_bytes()
