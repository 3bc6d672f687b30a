"""Sweeps (flows/sweep.py, scratchgpt.sweep): the grid and its members checked before anything runs, and, for
real, a 6-member classifier sweep (3 modes x 2 LoRA ranks, 2 at a time) on the tiny pipeline against a real
Prefect server and MLflow store: one member killed mid-run, the others completed, the comparison equal to
`dvc exp show`, the workspace untouched, and a rerun that redoes only the killed member."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import prefect_client, stop_group

from scratchgpt import compare
from scratchgpt import sweep as sw
from scratchgpt.plumbing.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
CLS = "lora-cls-finetune"
MODES = ("lora", "last-block", "full")
RANKS = (8, 16)
KILLED = "modes-full-8"  # rank 8: never run before, so its stage runs


# --- the grid, the members, the checks ----------------------------------------------------------------


def test_a_grid_expands_to_named_members():
    grid = sw.parse_grid(["cls.mode=lora,last-block,full", "cls.lora_rank=[8, 16]"])
    assert grid == {"cls.mode": ["lora", "last-block", "full"], "cls.lora_rank": [8, 16]}
    members = sw.member_names("modes", sw.expand(grid))
    assert [m.name for m in members] == ["modes-lora-8", "modes-lora-16", "modes-last-block-8",
                                         "modes-last-block-16", "modes-full-8", "modes-full-16"]  # fmt: skip
    assert members[1].overrides == {"cls.mode": "lora", "cls.lora_rank": 16}
    assert members[1].describe() == "cls.mode=lora cls.lora_rank=16"
    # override sets, each with each grid point; names from the keys that vary
    sets = [{"cls.train.lr": 1e-3}, {"cls.train.lr": 1e-4}]
    mixed = sw.member_names("lr", sw.expand({"cls.mode": ["lora"]}, sets))
    assert [m.name for m in mixed] == ["lr-0.001", "lr-0.0001"]
    assert sw.default_metric(members) == "cls.test_accuracy"
    instruct = sw.member_names("i", sw.expand({"instruct.train.lr": [1e-4, 5e-5]}))
    assert sw.default_metric(instruct) == "instruct.val_loss"


@pytest.mark.parametrize(("items", "message"), [
    (["cls.mode"], "expected KEY=V1,V2"),
    (["cls.mode=lora,lora"], "a value is repeated"),
    (["cls.mode=lora", "cls.mode=full"], "given twice"),
    (["cls.mode=[lora"], "not valid YAML"),
])  # fmt: skip
def test_a_bad_grid_is_refused(items, message):
    with pytest.raises(sw.SweepError, match=message):
        sw.parse_grid(items)


def test_every_members_overrides_are_checked_before_anything_runs():
    with pytest.raises(ParamsError, match=r"member m-nope \(cls.mode=nope\): cls: mode must be one of"):
        sw.plan(REPO, "m", [{"cls.mode": "lora"}, {"cls.mode": "nope"}])
    with pytest.raises(ParamsError, match="cls.lora_rnak: no such key in params.yaml; did you mean cls.lora_rank"):
        sw.plan(REPO, "m", [{"cls.lora_rnak": 8}])
    with pytest.raises(sw.SweepError, match="the same overrides"):
        sw.member_names("m", [{"cls.mode": "lora"}, {"cls.mode": "lora"}])
    with pytest.raises(sw.SweepError, match="sweep name"):
        sw.plan(REPO, "bad name", [{"cls.mode": "lora"}])
    with pytest.raises(sw.SweepError, match="needs a grid"):
        sw.plan(REPO, "m", [{}])


def test_the_best_member_is_the_highest_accuracy_or_the_lowest_loss():
    rows = [{"entry": "a", "cls.test_accuracy": 0.8, "instruct.val_loss": 2.0},
            {"entry": "b", "cls.test_accuracy": 0.9, "instruct.val_loss": 2.5}, {"entry": "c"}]  # fmt: skip
    assert sw.best(rows, "cls.test_accuracy")["entry"] == "b"
    assert sw.best(rows, "instruct.val_loss")["entry"] == "a"
    assert sw.best(rows, "judge.mean_score") is None


def test_a_bad_sweep_exits_2_before_any_flow_run():
    cmd = [sys.executable, str(REPO / "flows" / "sweep.py"), "--name", "m", "--grid", "cls.mode=lora,nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: member m-nope (cls.mode=nope)" in proc.stderr, proc.stderr[-2000:]


# --- for real: the 6-member sweep --------------------------------------------------------------------------


def workspace_state(project) -> dict:
    """What a sweep must leave as it found it: git's view, DVC's view, params.yaml, dvc.lock, the metrics."""
    root = project.path
    return {
        "git": project.run("git", "status", "--porcelain", stdout_only=True),
        "dvc": json.loads(project.run("dvc", "status", "--json", stdout_only=True)),
        "params": (root / "params.yaml").read_text(),
        "lock": (root / "dvc.lock").read_text(),
        "cls": (root / "metrics" / "cls.json").read_text(),
        "model": sorted(p.name for p in (root / "models" / "spam-classifier").iterdir()),
    }


def run_sweep(project, server, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """`python flows/sweep.py` on the project against the Prefect server; with `kill`, that member's stage
    process is killed (SIGKILL) once it runs."""
    cmd = [sys.executable, str(REPO / "flows" / "sweep.py"), "--project", str(project.path), "--name", "modes",
           "--grid", "cls.mode=" + ",".join(MODES), "--grid", "cls.lora_rank=" + ",".join(map(str, RANKS)),
           "--stages", CLS, "--max-parallel", "2", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=project.path, env={**project.env, **server.env,
                            "MLFLOW_TRACKING_URI": project.env["MLFLOW_TRACKING_URI"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed: list[int] = []
    if kill:
        threading.Thread(target=_kill_member_stage, args=(proc.pid, kill, killed), daemon=True).start()
    out, _ = proc.communicate(timeout=1200)
    assert not kill or killed, f"member {kill}'s stage was never seen running\n{out[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _kill_member_stage(root_pid: int, member: str, killed: list[int]) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            procs = psutil.Process(root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                if "lora_cls_finetune.py" in " ".join(p.cmdline()) and p.environ().get("DVC_EXP_NAME") == member:
                    time.sleep(1.0)  # well into its start-up
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.1)


def experiments_shown(project, prefix: str = "") -> dict[str, dict]:
    """The project's done DVC experiments whose names start with `prefix` (other tests add their own)."""
    return {k: v for k, v in sw.experiments(project.path, project.env).items() if k.startswith(prefix)}


def sweep_parent_runs(project) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("scratchgpt")
    return client.search_runs([exp.experiment_id], "tags.sweep = 'modes' and tags.sweep_member IS NOT NULL")


def artifacts_of(server) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect_client(server) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "sweep-summary", "sweep-comparison"])))  # fmt: skip


@pytest.fixture(scope="module")
def swept(cls_project, prefect_server):
    """The tiny pipeline up to the classifier (conftest's `cls_project`); then the sweep with member modes-full-8
    killed. Members DVC finds up to date (the baseline's last-block with rank 16) or in its run cache (test_compare's
    cls-MODE experiments, rank 16, when that module ran first) run nothing and take the runs that made them."""
    project = cls_project
    before = workspace_state(project)
    first = run_sweep(project, prefect_server, kill=KILLED)
    return project, before, first


@pytest.mark.slow
def test_a_sweep_runs_its_members_as_experiments_and_a_rerun_redoes_only_the_failed_one(swept, prefect_server):
    project, before, first = swept
    names = [f"modes-{m}-{r}" for m in MODES for r in RANKS]

    # the first run: the killed member failed, named with its error; the five others completed
    assert first.returncode == 1, first.stdout[-5000:]
    assert f"1 of 6 members failed ({KILLED})" in first.stdout, first.stdout[-5000:]
    assert set(experiments_shown(project, "modes-")) == set(names) - {KILLED}
    assert workspace_state(project) == before  # the workspace is untouched by the sweep

    # the rerun runs only the killed member, then compares all six
    second = run_sweep(project, prefect_server)
    assert second.returncode == 0, second.stdout[-5000:]
    assert "6 members (5 done before" in second.stdout
    assert second.stdout.count("dvc exp run --temp -n modes-") == 1 and f"-n {KILLED} " in second.stdout
    shown = experiments_shown(project, "modes-")
    assert set(shown) == set(names)
    assert workspace_state(project) == before

    # MLflow: a parent run per member run (the killed member's first one FAILED), each with its stage run nested
    parents = sweep_parent_runs(project)
    finished = {r.data.tags["sweep_member"]: r for r in parents if r.info.status == "FINISHED"}
    assert sorted(finished) == sorted(names) and len(parents) == 7
    assert [r.info.status for r in parents if r.info.status != "FINISHED"] == ["FAILED"]
    for name, run in finished.items():
        assert run.data.tags["dvc_exp_name"] == name and run.info.run_name == f"sweep modes · {name}"

    # the comparison: six entries whose numbers are those of `dvc exp show`
    out = project.path / "reports" / "sweeps" / "modes"
    rows = {r["entry"]: r for r in compare_rows(out)}
    assert sorted(rows) == sorted(names)
    for name in names:
        row = rows[name]
        metrics = shown[name]["metrics"]["metrics/cls.json"]
        assert float(row["cls.test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-12), name
        assert shown[name]["params"]["params.yaml"]["cls"]["mode"] == name.split("-", 1)[1].rsplit("-", 1)[0]

    # Prefect: the summary names the best member; the table is attached
    summaries = [a for a in artifacts_of(prefect_server) if a.key == "sweep-summary"]
    latest = max(summaries, key=lambda a: a.created).data
    best = max(names, key=lambda n: shown[n]["metrics"]["metrics/cls.json"]["test_accuracy"])  # the first of a tie
    assert f"**best by cls.test_accuracy** (highest): {best} (" in latest and f"`dvc exp apply {best}`" in latest
    assert sum(line.startswith("| modes-") for line in latest.splitlines()) == 6
    assert any(a.key == "sweep-comparison" for a in artifacts_of(prefect_server))

    # a member comes into the workspace with DVC's own command (which also complains of the stages this tiny
    # project never ran: instruct-finetune's outputs)
    subprocess.run(["dvc", "exp", "apply", "modes-lora-8"], cwd=project.path, env=project.env, capture_output=True,
                   timeout=300, check=False)  # fmt: skip
    assert "mode: lora" in (project.path / "params.yaml").read_text()
    applied = json.loads((project.path / "metrics" / "cls.json").read_text())
    assert applied == shown["modes-lora-8"]["metrics"]["metrics/cls.json"]


def compare_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with (out / compare.CSV_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.heavy
def test_ctrl_c_stops_the_running_members_and_leaves_nothing_running(swept, prefect_server):
    project = swept[0]
    before = workspace_state(project)
    cmd = [sys.executable, str(REPO / "flows" / "sweep.py"), "--project", str(project.path), "--name", "stop",
           "--grid", "cls.train.seed=101,102", "--stages", CLS, "--max-parallel", "2"]  # fmt: skip (new runs)
    proc = subprocess.Popen(cmd, cwd=project.path, env={**project.env, **prefect_server.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (stages := _member_stages(proc.pid, "stop-")):
            assert proc.poll() is None and time.monotonic() < deadline, "no member's stage started"
            time.sleep(0.2)
        members = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-3000:]
    _, alive = psutil.wait_procs(members, timeout=30)
    assert not alive, [p.pid for p in alive]  # the members' dvc, their stages: all gone
    assert stages
    queue = project.run("dvc", "queue", "status")
    assert "Running" not in queue and "Queued" not in queue, queue
    shown = json.loads(project.run("dvc", "exp", "show", "--json", "--no-fetch", stdout_only=True))
    left = [e for b in shown for e in b.get("experiments") or [] if e["name"].startswith("stop-")]
    assert not left, left  # neither saved nor listed as running
    assert workspace_state(project) == before


def _member_stages(root_pid: int, prefix: str) -> list[psutil.Process]:
    found = []
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(root_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "lora_cls_finetune.py" in " ".join(p.cmdline()) and p.environ().get("DVC_EXP_NAME", "").startswith(
                        prefix):  # fmt: skip
                    found.append(p)
    return found


@pytest.mark.slow
@pytest.mark.heavy
def test_members_spread_over_two_workers_of_one_pool(swept, prefect_server, tmp_path):
    """--pool: each member a flow run of prefect.yaml's `gpu` deployment (its pull steps, `dvc repro --pull`, the
    experiment pushed) on one of two process workers of one pool, each in its own clone of a bare git remote with
    a local-directory DVC remote; both members back here as DVC experiments, compared."""
    project = swept[0]
    root = project.path
    project.run("git", "checkout", "--", ".")  # the apply of the first test undone
    subprocess.run(["dvc", "checkout", "--force"], cwd=root, env=project.env, capture_output=True, check=False)
    for name in ("flows", "prefect.yaml"):
        src = REPO / name
        (shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
         if src.is_dir() else shutil.copy(src, root / name))  # fmt: skip
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-remote"
    project.run("git", "init", "-q", "--bare", str(origin))
    project.run("git", "remote", "add", "origin", str(origin))
    project.run("dvc", "remote", "add", "-d", "storage", str(storage))
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "flows, deployments, DVC remote")
    project.run("git", "push", "-q", "origin", "HEAD:main")
    project.run("dvc", "push")
    before = workspace_state(project)
    env = {**project.env, **prefect_server.env}
    prefect = str(Path(sys.executable).with_name("prefect"))
    for cmd in ([prefect, "work-pool", "create", "gpu", "--type", "process"],
                [prefect, "--no-prompt", "deploy", "--name", "pipeline/gpu"]):  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = []
    try:
        for i in (1, 2):
            clone = tmp_path / f"worker{i}"
            project.run("git", "clone", "-q", str(origin), str(clone))
            log = (tmp_path / f"worker{i}.log").open("w")
            workers.append(subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--limit", "1"], cwd=tmp_path,
                                            env={**env, "SCRATCHGPT_DIR": str(clone)}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        no_cuda = json.dumps({"env": {"SCRATCHGPT_DEVICE": "", "SCRATCHGPT_PRECISION": ""}})  # params.yaml's own
        cmd = [sys.executable, str(root / "flows" / "sweep.py"), "--project", str(root), "--name", "pool", "--grid",
               "cls.mode=lora,full", "--stages", CLS, "--pool", "gpu", "--job-variables", no_cuda]  # fmt: skip
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        logs = [(tmp_path / f"worker{i}.log").read_text() for i in (1, 2)]
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
    finally:
        for w in workers:
            stop_group(w, timeout=30)
    shown = experiments_shown(project)
    assert {"pool-lora", "pool-full"} <= set(shown)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with prefect_client(prefect_server) as client:
        named = FlowRunFilter(name=FlowRunFilterName(any_=["pool-lora", "pool-full"]))
        runs = client.read_flow_runs(flow_run_filter=named)
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    assert all(any(str(r.id) in log for r in runs) for log in logs), "each worker ran one member"
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two members ran at the same time"
    rows = {r["entry"]: r for r in compare_rows(root / "reports" / "sweeps" / "pool")}
    for name in ("pool-lora", "pool-full"):
        want = shown[name]["metrics"]["metrics/cls.json"]["test_accuracy"]
        assert float(rows[name]["cls.test_accuracy"]) == pytest.approx(want, abs=1e-12)
    assert workspace_state(project) == before
