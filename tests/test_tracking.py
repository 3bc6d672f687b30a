"""scratchgpt.plumbing.tracking against a real MLflow SQLite store (one store per module: a new DB costs ~2 s)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from scratchgpt.plumbing import tracking
from scratchgpt.plumbing.tracking import StageRun, flatten_params, pipeline_run, project_root, stage_run

_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_RUN_ID",
    "DVC_ROOT",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    tracking.ENV_EXPERIMENT,
    tracking.ENV_PARENT_RUN_ID,
    tracking.ENV_PROJECT_ROOT,
    tracking.ENV_TRACKING_SWITCH,
    tracking.ENV_RUN_TAGS,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Tracking URI of one SQLite store shared by this module's tests."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def env_store(store, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A directory that looks like the project root (dvc.yaml + .git) and holds the default store."""
    root = tmp_path_factory.mktemp("project")
    (root / ".git").mkdir()
    (root / ".dvc").mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclasses.dataclass
class Opt:
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass
class Params:
    epochs: int = 10
    start_context: str = "Every effort moves you"
    optim: Opt = dataclasses.field(default_factory=Opt)
    out: str | None = None


# --------------------------------------------------------------------------------------------
# pure functions


def test_flatten_params_nested_dataclass_and_long_values():
    flat = flatten_params({"pretrain": Params(), "note": "x" * 7000, "empty": {}, "p": Path("/a/b")})
    assert flat["pretrain.epochs"] == "10"
    assert flat["pretrain.optim.lr"] == "0.0004"
    assert flat["pretrain.optim.betas"] == "[0.9, 0.95]"
    assert flat["pretrain.out"] == "null"
    assert flat["pretrain.start_context"] == "Every effort moves you"
    assert flat["empty"] == "{}"
    assert flat["p"] == "/a/b"
    assert len(flat["note"]) == tracking.MAX_PARAM_VALUE_LEN
    assert flat["note"].endswith("[truncated]")
    with pytest.raises(ValueError, match="longer than"):
        flatten_params({"k" * 300: 1})
    with pytest.raises(TypeError, match="mapping or dataclass"):
        flatten_params([1, 2])


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_dirty_means_the_code_differs_not_what_dvc_writes(tmp_path):
    repo = tmp_path / "repo"
    files = ["src/pkg/models.py", "stages/train.py", "dvc.lock", "params.yaml", "metrics/m.json",
             "plots/loss.csv", "data.dvc", "models/pretrain.dvc", "reports/r.md"]
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("v1\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v1")
    info = tracking.git_info(repo)
    assert info["git_dirty"] == "false" and len(info["git_commit"]) == 40
    for name in files[2:]:  # what `dvc repro` / `dvc exp run` rewrite
        (repo / name).write_text("v2\n")
    (repo / "data").mkdir()
    (repo / "data" / "new.bin").write_text("x")  # untracked outputs
    assert tracking.git_info(repo)["git_dirty"] == "false"
    for code in files[:2]:  # src/pkg/models.py is code, not the models/ output directory
        (repo / code).write_text("v2\n")
        assert tracking.git_info(repo)["git_dirty"] == "true", code
        git(repo, "checkout", "-q", "--", code)
    assert tracking.git_info(repo)["git_dirty"] == "false"


def test_git_info_is_empty_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # whatever holds tmp_path
    assert tracking.git_info(tmp_path) == {}


def test_project_root_walks_up_to_dvc_yaml_and_git(project, monkeypatch):
    sub = project / "stages" / "deep"
    sub.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(sub)
    assert project_root() == project
    # A stage-level dvc.yaml without .git/.dvc beside it is not the root.
    (project / "stages" / "dvc.yaml").write_text("stages: {}\n")
    try:
        assert project_root() == project
    finally:
        (project / "stages" / "dvc.yaml").unlink()


def test_project_root_steps_out_of_dvc_exp_temp_copy(project, monkeypatch):
    tmp_copy = project / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (tmp_copy / ".git").mkdir(parents=True)
    (tmp_copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_copy)
    assert project_root() == project
    assert tracking.tracking_uri() == f"sqlite:///{project}/mlflow.db"
    shutil.rmtree(project / ".dvc" / "tmp")


def test_tracking_uri_from_env_is_kept_relative_sqlite_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("http://127.0.0.1:5000", f"sqlite:///{tmp_path}/a.db"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.tracking_uri() == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/rel/m.db"


def test_project_root_env_overrides(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path  # nothing found: the cwd
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert project_root() == project
    monkeypatch.setenv("DVC_ROOT", str(project / ".dvc" / "tmp" / "exps" / "tmpx"))
    (project / ".dvc" / "tmp" / "exps" / "tmpx").mkdir(parents=True)
    try:
        assert project_root() == project
    finally:
        shutil.rmtree(project / ".dvc" / "tmp")
    monkeypatch.setenv(tracking.ENV_PROJECT_ROOT, str(tmp_path / "elsewhere"))
    assert project_root() == tmp_path / "elsewhere"


# --------------------------------------------------------------------------------------------
# runs in the shared store


def test_stage_run_logs_params_metrics_tags_artifacts(env_store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tree")
    artifact = tmp_path / "loss.png"
    artifact.write_bytes(b"\x89PNG fake")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"emb_dim": 8}')
    with stage_run("pretrain", {"pretrain": Params()}, preset="cpu", experiment="t-log") as run:
        assert run.enabled and run.tracking_uri == env_store
        for step in range(3):
            run.log_metrics({"train_loss": 5.0 - step, "lr": 1e-3}, step=step * 10)
        run.log_params({"extra": {"k": 1}})
        run.set_tags({"note": "hello"})
        run.log_artifact(artifact, "plots")
        run.log_artifact(ckpt, "checkpoint")
        run.log_text("Every effort moves you forward", "samples/epoch_1.txt")
        run.log_dict({"final": 1.5}, "metrics.json")
        with pytest.raises(FileNotFoundError, match=r"nope\.png"):
            run.log_artifact(tmp_path / "nope.png")
        with pytest.raises(TypeError, match="'bad'"):
            run.log_metrics({"bad": "x"})

    c = client(env_store)
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "pretrain · preset cpu · exp bushy-tree"
    assert got.data.params["pretrain.optim.lr"] == "0.0004"
    assert got.data.params["pretrain.epochs"] == "10"
    assert got.data.params["extra.k"] == "1"
    tags = got.data.tags
    assert tags["dvc_stage"] == "pretrain"
    assert tags["preset"] == "cpu"
    assert tags["scratchgpt_version"] == tracking.__version__
    assert tags["dvc_exp_name"] == "bushy-tree"
    assert tags["note"] == "hello"
    assert "mlflow.parentRunId" not in tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["git_dirty"] in ("true", "false")
    else:  # not run from a git checkout
        assert "git_commit" not in tags
    history = c.get_metric_history(run.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 5.0), (10, 4.0), (20, 3.0)]

    files = {f.path for f in c.list_artifacts(run.run_id)}
    assert files >= {"plots", "checkpoint", "samples", "metrics.json", "params.json"}
    local = Path(c.download_artifacts(run.run_id, "", str(tmp_path / "dl")))
    assert (local / "plots" / "loss.png").read_bytes() == b"\x89PNG fake"
    assert json.loads((local / "checkpoint" / "config.json").read_text()) == {"emb_dim": 8}
    assert (local / "samples" / "epoch_1.txt").read_text() == "Every effort moves you forward"
    assert json.loads((local / "params.json").read_text())["pretrain"]["optim"]["lr"] == 4e-4

    df = mlflow.search_runs(experiment_names=["t-log"], filter_string="tags.dvc_stage = 'pretrain'")
    assert list(df["run_id"]) == [run.run_id]


def test_env_experiment_and_absolute_artifact_location(env_store, monkeypatch):
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, "from-env")
    with stage_run("tokenize", {"a": 1}) as run:
        pass
    exp = client(env_store).get_experiment(run.experiment_id)
    assert exp.name == "from-env"
    store_dir = Path(env_store.removeprefix("sqlite:///")).parent
    assert exp.artifact_location == (store_dir / "mlruns" / "from-env").as_uri()


def test_run_names_say_what_the_run_is(env_store, monkeypatch):
    with stage_run("lora-cls-finetune", {}, preset="cpu", details=["lora r16"], experiment="t-names") as lora:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "cls-full")
    with stage_run("lora-cls-finetune", {}, preset="book", details=["full", ""], experiment="t-names") as full:
        pass
    with stage_run("evaluate", {}, details=["no judge"], run_name="my name", experiment="t-names") as named:
        pass
    c = client(env_store)
    assert c.get_run(lora.run_id).info.run_name == "lora-cls-finetune · lora r16 · preset cpu"
    assert c.get_run(full.run_id).info.run_name == "lora-cls-finetune · full · preset book · exp cls-full"
    assert c.get_run(named.run_id).info.run_name == "my name"  # an explicit name wins
    monkeypatch.delenv("DVC_EXP_NAME")
    assert tracking.stage_run_name("evaluate", ["no judge"]) == "evaluate · no judge"


def _view_columns(tags: dict[str, str]) -> list[str]:
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW_ID}"])  # the MLflow UI's envelope
    assert view["name"] == tracking.RUNS_VIEW_NAME and isinstance(view["createdAt"], int)
    return json.loads(view["state"])["selectedColumns"]


def test_experiments_open_as_model_training_with_a_saved_runs_view(env_store):
    with stage_run("pretrain", {}, experiment="t-kind") as run:
        pass
    c = client(env_store)
    tags = c.get_experiment(run.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert {"params.`cls.mode`", "metrics.`final_test_accuracy`", "metrics.`final_val_loss`"} <= set(
        _view_columns(tags))  # fmt: skip

    # an experiment made before (by MLflow, untagged) is marked when a run next goes to it ...
    old = c.create_experiment("t-kind-old")
    with stage_run("pretrain", {}, experiment="t-kind-old"):
        pass
    tags = c.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and _view_columns(tags)
    # ... but a kind or a view someone set since is theirs
    c.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    c.set_experiment_tag(old, f"mlflow.sharedViewState.{tracking.RUNS_VIEW_ID}", "{}")
    with stage_run("pretrain", {}, experiment="t-kind-old"):
        pass
    tags = c.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "genai_development"
    assert tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW_ID}"] == "{}"


def test_an_orchestrators_tags_reach_every_run(env_store, monkeypatch, caplog):
    url = "http://127.0.0.1:4200/runs/flow-run/1234"
    monkeypatch.setenv(tracking.ENV_RUN_TAGS, json.dumps({"prefect_flow_run_url": url, "prefect_flow_run_id": 1234}))
    with stage_run("pretrain", {}, experiment="t-env-tags", tags={"note": "x"}) as run:
        pass
    tags = client(env_store).get_run(run.run_id).data.tags
    assert (tags["prefect_flow_run_url"], tags["prefect_flow_run_id"], tags["note"]) == (url, "1234", "x")
    assert tags["dvc_stage"] == "pretrain"

    monkeypatch.setenv(tracking.ENV_RUN_TAGS, "[not an object")
    with stage_run("pretrain", {}, experiment="t-env-tags") as run:  # a malformed value never fails a stage
        pass
    assert "prefect_flow_run_url" not in client(env_store).get_run(run.run_id).data.tags
    assert f"{tracking.ENV_RUN_TAGS} is not a JSON object of tags" in caplog.text


def test_ui_urls_only_for_a_tracking_server():
    server = "http://127.0.0.1:5000/"
    assert tracking.ui_url(server, "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")  # fmt: skip
    assert tracking.ui_url(server, "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.ui_url(server, "3", view=True) == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=scratchgpt-runs&workflowType=machine_learning")
    assert tracking.ui_url("https://mlflow.example.org", "3", "abc").startswith("https://mlflow.example.org/#/")
    for local in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        assert tracking.ui_url(local, "3", "abc") is None


def test_exception_marks_run_failed_and_propagates(env_store):
    with pytest.raises(RuntimeError, match="loss is nan"), stage_run("pretrain", {}, experiment="t-fail") as run:
        run.log_metrics({"train_loss": 3.0}, step=1)
        raise RuntimeError("loss is nan")
    got = client(env_store).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "RuntimeError: loss is nan"
    assert got.data.metrics["train_loss"] == 3.0


def test_nested_under_parent_from_env_parent_stays_running(env_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "ignored-on-purpose")
    with pipeline_run("full", {"preset": "cpu"}, experiment="t-nest") as parent:
        env = parent.child_env()
        assert env == {
            "MLFLOW_TRACKING_URI": env_store,
            "MLFLOW_REGISTRY_URI": env_store,
            tracking.ENV_EXPERIMENT: "t-nest",
            tracking.ENV_PARENT_RUN_ID: parent.run_id,
        }
        monkeypatch.setenv(tracking.ENV_PARENT_RUN_ID, parent.run_id)
        with stage_run("download", {"x": 1}) as child:
            pass
        c = client(env_store)
        assert c.get_run(parent.run_id).info.status == "RUNNING"
        got = c.get_run(child.run_id)
        assert got.info.status == "FINISHED"
        assert got.data.tags["mlflow.parentRunId"] == parent.run_id
        assert got.info.experiment_id == parent.experiment_id  # follows its parent's experiment
    assert c.get_run(parent.run_id).info.status == "FINISHED"
    assert c.get_run(parent.run_id).data.tags["pipeline"] == "full"


def test_unknown_parent_is_a_clear_error(env_store, monkeypatch):
    monkeypatch.setenv(tracking.ENV_PARENT_RUN_ID, "0" * 32)
    with (
        pytest.raises(RuntimeError, match=r"SCRATCHGPT_MLFLOW_PARENT_RUN_ID=0+: no such MLflow run"),
        stage_run("pretrain", {}),
    ):
        pytest.fail("the block must not run")


def test_logging_from_threads_by_run_id(env_store):
    with stage_run("pretrain", {}, experiment="t-threads") as run:

        def work(k):
            for step in range(5):
                run.log_metrics({f"m{k}": float(step)}, step=step)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    c = client(env_store)
    for k in range(3):
        assert [m.value for m in c.get_metric_history(run.run_id, f"m{k}")] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_run_sets_mlflows_tracking_and_registry_uri_to_its_store_and_puts_them_back(env_store, tmp_path, monkeypatch):
    import mlflow

    (tmp_path / ".git").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = f"sqlite:///{tmp_path}/mlflow.db"
    with stage_run("evaluate", {}, experiment="t-uris") as run:
        # MLflow's own lookups (e.g. of a logged model while registering) and subprocesses see the run's store
        assert run.tracking_uri == mlflow.get_tracking_uri() == mlflow.get_registry_uri() == default
        assert os.environ["MLFLOW_TRACKING_URI"] == os.environ["MLFLOW_REGISTRY_URI"] == default
        assert run.client._registry_uri == default
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == env_store  # nothing left pinned


def test_registry_uri_naming_another_store_is_a_clear_error_before_any_run(env_store, tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", other)
    with (
        pytest.raises(ValueError, match=f"MLFLOW_REGISTRY_URI={other} is not the tracking store {env_store}"),
        stage_run("pretrain", {}, experiment="t-registry"),
    ):
        pytest.fail("the block must not run")
    assert not (tmp_path / "registry.db").exists()
    assert client(env_store).get_experiment_by_name("t-registry") is None
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", env_store)  # the same store is fine
    with stage_run("pretrain", {}, experiment="t-registry") as run:
        pass
    assert client(env_store).get_run(run.run_id).info.status == "FINISHED"


def test_env_tracking_uri_wins_over_project_store(env_store, project, monkeypatch):
    monkeypatch.chdir(project)
    with stage_run("evaluate", {}, experiment="t-envwins") as run:
        pass
    assert run.tracking_uri == env_store
    assert client(env_store).get_run(run.run_id).info.status == "FINISHED"
    assert not (project / "mlflow.db").exists()


def test_disabled_run_is_a_noop_that_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for kwargs, switch in (({"enabled": False}, None), ({}, "0"), ({}, "off")):
        if switch:
            monkeypatch.setenv(tracking.ENV_TRACKING_SWITCH, switch)
        with stage_run("pretrain", {"a": 1}, **kwargs) as run:
            assert isinstance(run, StageRun) and not run.enabled and run.run_id is None
            run.log_metrics({"loss": 1.0}, step=1)
            run.log_params({"b": 2})
            run.log_artifact(tmp_path / "missing-but-ignored")
            run.log_text("t", "t.txt")
            run.log_dict({}, "d.json")
            run.set_tags({"t": 1})
            assert run.child_env() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------
# default store in the project root, from a `dvc exp run --temp` style copy, in a real subprocess

CHILD = textwrap.dedent(
    """
    import sys
    from scratchgpt.plumbing.tracking import stage_run
    with stage_run("pretrain", {"lr": 0.1}, preset="cpu") as run:
        run.log_metrics({"val_loss": 6.4}, step=7)
        run.log_text("sample", "samples/end.txt")
    print(run.run_id)
    """
)


def test_default_store_is_absolute_in_project_root_and_survives_exp_temp_dir(project, monkeypatch):
    monkeypatch.chdir(project)
    assert tracking.tracking_uri() == f"sqlite:///{project}/mlflow.db"
    with pipeline_run("full", {}) as parent:
        assert parent.tracking_uri == f"sqlite:///{project}/mlflow.db"
        assert (project / "mlflow.db").is_file()
        exp = client(parent.tracking_uri).get_experiment(parent.experiment_id)
        assert exp.name == "scratchgpt"
        assert exp.artifact_location == (project / "mlruns" / "scratchgpt").as_uri()

        # A copy like `dvc exp run --temp` makes; the stage runs there, without MLFLOW_TRACKING_URI.
        tmp_copy = project / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
        (tmp_copy / ".git").mkdir(parents=True)
        (tmp_copy / "dvc.yaml").write_text("stages: {}\n")
        env = {k: v for k, v in os.environ.items() if k not in _ENV}
        env[tracking.ENV_PARENT_RUN_ID] = parent.run_id
        out = subprocess.run(
            [sys.executable, "-c", CHILD], cwd=tmp_copy, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        child_id = out.stdout.strip().splitlines()[-1]
        shutil.rmtree(project / ".dvc" / "tmp")

        c = client(parent.tracking_uri)
        assert c.get_run(parent.run_id).info.status == "RUNNING"
    got = c.get_run(child_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.data.tags["preset"] == "cpu"
    assert got.data.metrics["val_loss"] == 6.4
    assert got.info.artifact_uri.startswith((project / "mlruns").as_uri())
    assert (project / "mlruns" / "scratchgpt" / child_id / "artifacts" / "samples" / "end.txt").read_text() == (
        "sample"
    )
    assert c.get_run(parent.run_id).info.status == "FINISHED"
