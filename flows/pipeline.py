"""Prefect flow `pipeline`: the DVC stages of dvc.yaml in pipeline order, one Prefect task each.

Each task runs `dvc repro --single-item STAGE` (DVC decides what is up to date; the tasks use no Prefect
cache) and streams its output into the Prefect log. A failing stage fails the flow run, naming the stage.
`download` (and `load-gpt2`, which may download weights) retry with backoff; nothing else retries:
a rerun of a training stage resumes from its checkpoint (`resume: auto`).

    python flows/pipeline.py                                   # every stage, params.yaml as it is
    python flows/pipeline.py --stages pretrain                 # pretrain and what it depends on
    python flows/pipeline.py --set pretrain.train.lr=1e-3      # a DVC experiment (`dvc exp show`)
    python flows/pipeline.py --preset book --device cuda --precision bf16-mixed --nproc 4

Overrides (`--set`, and `--device`/`--precision`/`--nproc`, which set every `*.device`, `*.precision`,
`*.nproc` key of params.yaml) are checked against params.yaml before any stage runs. Overrides that
change a value are written into params.yaml as `dvc exp run -S` writes them, the stages run, and the
workspace is saved as a DVC experiment (`dvc exp save`, shown by `dvc exp show`; `dvc exp apply NAME`
brings it into the workspace); then params.yaml, dvc.lock and the stages' outputs are put back as they
were (after a crash, by the next run), so the workspace stays the baseline's. Without overrides the run
is a plain `dvc repro`.

The flow opens an MLflow parent run (tags: Prefect flow-run id, git commit, preset, DVC experiment)
under which the stages' runs nest, and ends with a markdown artifact `pipeline-summary`: each stage's
state (ran, skipped as up to date, restored from DVC's run cache, failed, not run), wall time and
headline metrics. One flow run at a time per checkout (a lock; a second run waits up to
`--lock-timeout` seconds, then fails naming the first).

Without PREFECT_API_URL the flow runs on a temporary local Prefect server; deployments: prefect.yaml.
Flow parameters left unset fall back to the environment (the work pools' job variables):
SCRATCHGPT_DEVICE, SCRATCHGPT_PRECISION, SCRATCHGPT_NPROC.
"""

from __future__ import annotations

import os

# Offline and quiet: no telemetry or update checks (set before Prefect and MLflow are imported).
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import PrefectConcurrentFuture, PrefectFuture  # noqa: E402
from prefect.runtime import deployment as runtime_deployment  # noqa: E402
from prefect.runtime import flow_run as runtime_flow_run  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402
from prefect.utilities.urls import url_for  # noqa: E402

from scratchgpt import orchestration as orch  # noqa: E402
from scratchgpt.plumbing import tracking  # noqa: E402
from scratchgpt.plumbing.params import ParamsError, read_params  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parents[1]
# `download` retries with backoff (the network; its downloader also retries each file). Nothing else
# retries: the other stages are deterministic, and a rerun of a training stage resumes its checkpoint.
RETRIES = {"download": 3}
RETRY_BACKOFF_S = 10
ENV_FALLBACKS = {"device": "SCRATCHGPT_DEVICE", "precision": "SCRATCHGPT_PRECISION", "nproc": "SCRATCHGPT_NPROC"}
SUMMARY_KEY = "pipeline-summary"


class StageFailed(RuntimeError):
    """`dvc repro` of one stage exited non-zero."""

    def __init__(self, stage: str, returncode: int, tail: list[str], wall_time_s: float) -> None:
        super().__init__(f"stage '{stage}' failed (`dvc repro --single-item {stage}` exited with {returncode}): "
                         f"{error_line(tail)}")  # fmt: skip
        self.stage = stage
        self.returncode = returncode
        self.wall_time_s = wall_time_s


def error_line(lines: list[str]) -> str:
    """The most telling line of a failed stage's output: the stage's own logged error (`... ERROR msg`),
    else the last line of a traceback, else DVC's `ERROR: ...`, else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    logged = [line.split(" ERROR ", 1)[1] for line in lines if " ERROR " in line]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    dvc = [line for line in lines if line.startswith("ERROR:")]
    return next((group[-1] for group in (logged, raised, dvc, lines) if group), "(no output)")


# ---------------------------------------------------------------------------------------------
# Tasks


@task(cache_policy=NO_CACHE, retries=0)
def run_stage(stage: str, root: str, tracking_env: dict[str, str], pull: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` in `root`, its output streamed to the Prefect log line by line.

    `tracking_env` (the parent MLflow run's `child_env()`) is added to this process's environment.
    """
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage, *(["--pull"] if pull else [])]
    logger.info("$ %s", " ".join(cmd))
    start = time.monotonic()
    seen: list[str] = []  # the lines DVC's verdict is read from

    def on_line(line: str) -> None:
        logger.info("%s", line)
        if stage in line and ("stage" in line.lower() or "Pulling data" in line):
            seen.append(line)

    returncode, tail = orch.stream_command(cmd, root, stage_env(tracking_env), on_line)
    wall = time.monotonic() - start
    if returncode != 0:
        raise StageFailed(stage, returncode, tail, wall)
    state = orch.stage_outcome(stage, "\n".join(seen))
    logger.info("stage %s: %s in %.1f s", stage, state, wall)
    return {"stage": stage, "state": state, "wall_time_s": wall}


@task(cache_policy=NO_CACHE, retries=0)
def save_experiment(root: str, name: str, stages: list[str], push: bool = False) -> str:
    """`dvc exp save -n NAME STAGE...` (the workspace as a DVC experiment, caching the outputs of the stages
    the run covered: the others' may not exist); with `push`, `dvc exp push origin NAME` (the experiment's git
    ref to the git remote `origin`, its outputs to the default DVC remote)."""
    logger = get_run_logger()
    commands = [["dvc", "exp", "save", "--force", "-n", name, *stages]]
    if push:
        commands.append(["dvc", "exp", "push", "--force", "origin", name])
    for cmd in commands:
        logger.info("$ %s", " ".join(cmd))
        proc = subprocess.run(cmd, cwd=root, env=stage_env({}), capture_output=True, text=True, timeout=3600)
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.strip():
                logger.info("%s", line)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return name


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="pipeline")
def pipeline(
    stages: list[str] | None = None,
    preset: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    nproc: int | None = None,
    overrides: dict[str, Any] | None = None,
    exp_name: str | None = None,
    pull: bool = False,
    push: bool = False,
    lock_timeout: float = 600.0,
    project_dir: str | None = None,
    mlflow_tags: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the DVC pipeline, or `stages` and what they depend on.

    preset: presets/<name>.yaml as overrides (e.g. "book"); device, precision, nproc and overrides win
    over it. device: auto|cpu|cuda|mps for every `*.device` param; precision: fp32|bf16-mixed for every
    `*.precision`; nproc: processes per training stage (`*.train.nproc`, run under torchrun). Unset:
    $SCRATCHGPT_DEVICE / $SCRATCHGPT_PRECISION / $SCRATCHGPT_NPROC, else params.yaml as it is.
    overrides: {"pretrain.train.lr": 3e-4, ...}, checked before any stage runs. exp_name: name of the DVC
    experiment (default prefect-<flow run name>; an experiment of that name is replaced). pull: `dvc repro
    --pull` (unchanged stages take their outputs from the DVC remote). push: save the run as a DVC
    experiment even without overrides and `dvc exp push origin` it. lock_timeout: seconds to wait for
    another flow run on this checkout. project_dir: the checkout (default: the one holding this file).
    mlflow_tags: more tags of the MLflow parent run (a sweep tags its members with it).

    With overrides the run is a DVC experiment, and the workspace stays the baseline's: params.yaml, dvc.lock
    and the outputs are put back when the run ends (`orchestration.baseline_kept`).
    """
    logger = get_run_logger()
    root = Path(project_dir or PROJECT_DIR).resolve()
    hardware = hardware_params(device, precision, nproc)
    selected = orch.select_stages(orch.read_stages(root), stages)
    requested = orch.requested_overrides(root, preset, hardware, overrides)
    orch.resolve_overrides(read_params(root / "params.yaml"), requested)  # refuse bad overrides before waiting
    tracking.check_store(tracking_uri_of(root))  # an unreachable store fails the run before any task

    flow_run_name = runtime_flow_run.name or "local"
    holder = {"flow_run": flow_run_name, "flow_run_id": str(runtime_flow_run.id or ""),
              "pid": os.getpid(), "host": socket.gethostname()}  # fmt: skip

    def waiting(other: dict[str, Any]) -> None:
        logger.warning("waiting (up to %g s) for another run on this checkout: %s", lock_timeout,
                       orch.describe_holder(other))  # fmt: skip

    with orch.checkout_lock(root, holder, timeout=lock_timeout, on_wait=waiting), _logged_lock(logger, root):
        if orch.restore_params(root):
            logger.warning("restored params.yaml from %s: a run was killed with its overrides applied",
                           orch.PARAMS_BACKUP)  # fmt: skip
        if orch.restore_baseline(root, stage_env({})):
            logger.warning("restored dvc.lock and the outputs from %s: a run with overrides was killed",
                           orch.BASELINE_DIR)  # fmt: skip
        params = read_params(root / "params.yaml")
        changes = orch.resolve_overrides(params, requested)
        experiment = (exp_name or f"prefect-{flow_run_name}") if (changes or push) else None
        if changes:
            logger.info("overrides, saved as DVC experiment %s; params.yaml, dvc.lock and the outputs are put back "
                        "when the run ends (`dvc exp apply %s` brings its results in): %s", experiment, experiment,
                        " ".join(orch.dvc_set_args(changes)))  # fmt: skip
        kept = orch.baseline_kept(root, selected) if changes else contextlib.nullcontext()
        with kept, orch.overrides_applied(root, changes):
            params = read_params(root / "params.yaml")
            return _run_pipeline(root, selected, params, changes, preset, hardware, experiment, pull, push,
                                 mlflow_tags or {})  # fmt: skip


@contextlib.contextmanager
def _logged_lock(logger, root: Path):
    logger.info("holding the checkout lock of %s", root)
    try:
        yield
    finally:
        logger.info("releasing the checkout lock")


def hardware_params(device: str | None, precision: str | None, nproc: int | None) -> dict[str, Any]:
    values: dict[str, Any] = {"device": device, "precision": precision, "nproc": nproc}
    for name, env in ENV_FALLBACKS.items():
        if values[name] is None and os.environ.get(env, "").strip():
            text = os.environ[env].strip()
            try:
                values[name] = int(text) if name == "nproc" else text
            except ValueError:
                raise ParamsError(f"{env}={text!r}: expected a positive integer") from None
    return values


def _run_pipeline(
    root, selected, params, changes, preset, hardware, experiment, pull, push, mlflow_tags
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    git = tracking.git_info(root)
    tags = {
        "prefect_flow_run_id": str(runtime_flow_run.id or ""),
        "prefect_flow_run_name": runtime_flow_run.name or "",
        "prefect_flow_run_url": flow_run_url(),
        "prefect_deployment": runtime_deployment.name or "",
        "dvc_exp_name": experiment or "",
        **git,
        **mlflow_tags,
    }
    if "git_commit" in git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
    run_params = {
        "stages": ",".join(s.name for s in selected),
        "preset_file": preset or "none",
        **{k: ("params.yaml" if v is None else v) for k, v in hardware.items()},
        "pull": pull,
        "push": push,
        "override": {k: orch.yaml_value(v) for k, v in changes.items()},
    }
    uri = tracking_uri_of(root)
    results: list[dict[str, Any]] = []
    failure: Exception | None = None
    with tracking.pipeline_run(
        "pipeline", run_params, preset=orch.presets_of(params), run_name=f"pipeline {tags['prefect_flow_run_name']}",
        tags={k: v for k, v in tags.items() if v}, tracking_uri=uri,
    ) as run:  # fmt: skip
        tracking_env = {**run.child_env(), **_stage_tags(tags)}  # stage runs nest under the parent run
        # The stages run one at a time, in pipeline order; `wait_for` hands Prefect dvc.yaml's edges, which
        # its flow-run graph draws (task runs' upstream dependencies).
        upstream = orch.upstream_graph(selected)
        done: dict[str, PrefectFuture] = {}
        where = str(root)
        for stage in selected:
            task_fn = run_stage.with_options(
                name=f"stage-{stage.name}",
                task_run_name=stage.name,
                retries=RETRIES.get(stage.name, 0),
                retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
            )
            state = task_fn(stage.name, where, tracking_env, pull, return_state=True,
                            wait_for=[done[u] for u in upstream[stage.name]])  # fmt: skip
            done[stage.name] = _finished(state)
            try:
                results.append(state.result())
            except StageFailed as exc:
                results.append({"stage": stage.name, "state": orch.FAILED, "wall_time_s": exc.wall_time_s})
                failure = exc
                break
        results += [{"stage": s.name, "state": orch.NOT_RUN} for s in selected[len(results):]]
        if failure is None and experiment:
            last = [done[name] for name in upstream if not any(name in ups for ups in upstream.values())]
            try:  # quote: the stage names are not data from the stages' results (no graph edge from each)
                save_experiment.with_options(task_run_name="save-experiment")(
                    where, experiment, quote([s.name for s in selected]), push, wait_for=last
                )
            except Exception as exc:  # reported in the summary, then raised
                failure = exc
        _report(root, selected, results, run, experiment, changes, failure)
        if failure is not None:
            raise failure
    logger.info("pipeline completed: %s", ", ".join(f"{r['stage']} {r['state']}" for r in results))
    return results


def tracking_uri_of(root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else the checkout's own store (the flow may run elsewhere)."""
    uri = os.environ.get(tracking.ENV_TRACKING_URI) and tracking.tracking_uri()
    return uri or f"sqlite:///{root / tracking.DB_NAME}"

def _finished(state: State) -> PrefectFuture:
    """A finished task run as `wait_for` takes it, to draw an edge from it. Not its State: Prefect would look
    through the State's result for objects other tasks returned too (the "ran" of every stage's result) and
    draw an edge from the last task that returned one."""
    future: concurrent.futures.Future[State] = concurrent.futures.Future()
    future.set_result(state)
    return PrefectConcurrentFuture(state.state_details.task_run_id, future)


def flow_run_url() -> str:
    """This flow run's page in the Prefect UI; "" on a temporary server (no UI URL: it is gone after the run)."""
    if runtime_flow_run.id is None:
        return ""
    return url_for("flow-run", obj_id=runtime_flow_run.id) or ""


def _stage_tags(tags: dict[str, str]) -> dict[str, str]:
    """The environment that tags each stage's MLflow run with this flow run (id, name, UI page, deployment)."""
    prefect = {k: v for k, v in tags.items() if k.startswith("prefect_") and v}
    return {tracking.ENV_RUN_TAGS: json.dumps(prefect)} if prefect else {}


def stage_env(tracking_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env.update(tracking_env)
    env.setdefault("TQDM_DISABLE", "1")  # progress bars make poor log lines
    env["PYTHONUNBUFFERED"] = "1"  # stream the stage's lines as they come
    return env


def _report(root, selected, results, run, experiment, changes, failure) -> None:
    """Headline metrics and child MLflow runs into `results`; the summary as a Prefect artifact and as
    the parent run's `summary.md`; stage wall times as parent metrics."""
    by_name = {s.name: s for s in selected}
    children = _child_runs(run)
    for r in results:
        if r["state"] in (orch.RAN, orch.SKIPPED, orch.RESTORED, orch.PULLED):
            r["metrics"] = orch.headline_metrics(root, by_name[r["stage"]])
        if r["state"] in (orch.RAN, orch.FAILED) and r["stage"] in children:
            r["mlflow_run_id"] = children[r["stage"]]
            r["mlflow_run_url"] = mlflow_url(run, children[r["stage"]])
    info = {
        "status": "FAILED" if failure else "COMPLETED",
        "error": str(failure) if failure else None,
        "project": str(root),
        "DVC experiment": experiment,
        "overrides": " ".join(orch.dvc_set_args(changes)) or None,
        "MLflow parent run": orch.md_link(run.run_id, mlflow_url(run, run.run_id)),
    }
    if view := mlflow_url(run, None):
        info["MLflow runs"] = orch.md_link(tracking.RUNS_VIEW_NAME, view)
    markdown = orch.summary_markdown(results, info)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_KEY, description="Stages, states, times, metrics")
    with contextlib.suppress(Exception):  # tracking is a nicety here; never mask the run's outcome
        run.log_text(markdown, "summary.md")
        run.log_metrics({f"time_s.{r['stage']}": r["wall_time_s"] for r in results if r.get("wall_time_s")})
        run.set_tags({"skipped_stages": ",".join(r["stage"] for r in results if r["state"] == orch.SKIPPED)})


def mlflow_url(run: tracking.StageRun, run_id: str | None) -> str | None:
    """The MLflow UI's page of run `run_id` (None: the experiment's runs in the saved view), when the store is
    a tracking server."""
    if not run.enabled:
        return None
    return tracking.ui_url(run.tracking_uri, run.experiment_id, run_id, view=run_id is None)


def _child_runs(run: tracking.StageRun) -> dict[str, str]:
    """{stage: run id} of the stage runs nested under `run` (the latest per stage). A stage run still
    RUNNING now, when every stage has ended, lost its process (killed, out of memory): it is marked FAILED,
    so that MLflow shows it failed."""
    if not run.enabled:
        return {}
    try:
        found = run.client.search_runs(
            [run.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'",
            order_by=["attributes.start_time ASC"],
        )  # fmt: skip
    except Exception:
        return {}
    for lost in (r for r in found if r.info.status == "RUNNING"):
        with contextlib.suppress(Exception):
            run.client.set_tag(lost.info.run_id, "error", "the stage's process ended without ending its run")
            run.client.set_terminated(lost.info.run_id, status="FAILED")
    return {r.data.tags.get("dvc_stage", r.info.run_name): r.info.run_id for r in found}


# ---------------------------------------------------------------------------------------------
# Command line


def boot_temporary_server() -> threading.Thread | None:
    """Start the temporary Prefect server a flow call would start (none when PREFECT_API_URL is set), in a
    thread, so its boot (4-10 s) overlaps this process's imports and checks instead of following them.

    Prefect's own client then finds the server running (`SubprocessASGIServer` is one per process) and
    stops it at exit, as it does its own. Join the thread before the first flow call.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def boot() -> None:
        with contextlib.suppress(Exception):  # a failed boot is retried, and reported, by the flow call
            SubprocessASGIServer().start()

    thread = threading.Thread(target=boot, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python flows/pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="run these and what they depend on (default: all)")
    parser.add_argument("--preset", help="presets/<name>.yaml as overrides, e.g. book")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="every *.device param")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], help="every *.precision param")
    parser.add_argument("--nproc", type=int, metavar="N", help="processes per training stage (torchrun)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value (repeatable), e.g. pretrain.train.lr=3e-4")  # fmt: skip
    parser.add_argument("--exp-name", help="name of the DVC experiment (default: prefect-<flow run name>)")
    parser.add_argument("--pull", action="store_true", help="dvc repro --pull: take unchanged outputs from the remote")
    parser.add_argument("--push", action="store_true", help="save as a DVC experiment and dvc exp push origin")
    parser.add_argument("--lock-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for another flow run here (default: %(default)s)")  # fmt: skip
    parser.add_argument("--project", default=str(PROJECT_DIR), help="the checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.nproc is not None and args.nproc < 1:
        parser.error("--nproc must be >= 1")
    # SIGTERM (kill, systemd, a worker cancelling): Prefect turns it into an exception that stops the stage
    # (see run_stage), then re-delivers it to this handler, which exits through atexit, so the temporary
    # server is stopped too instead of being left behind.
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    server = boot_temporary_server()  # boots in its own process while this one checks the arguments
    try:  # bad stages or overrides: exit before any flow run exists
        overrides = orch.parse_assignments(args.overrides)
        root = Path(args.project).resolve()
        orch.select_stages(orch.read_stages(root), args.stages)
        hardware = hardware_params(args.device, args.precision, args.nproc)
        requested = orch.requested_overrides(root, args.preset, hardware, overrides)
        orch.resolve_overrides(read_params(root / "params.yaml"), requested)
        tracking.check_store(tracking_uri_of(root))
    except (ParamsError, orch.PipelineError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import mlflow  # noqa: F401  # the flow's first MLflow call would import it; do it while the server boots
    if server is not None:
        server.join()
    try:
        state = _run_cli_flow(args, overrides, root)
    except KeyboardInterrupt:
        print("pipeline interrupted", file=sys.stderr)
        return 130
    return exit_code(state, "pipeline")


def exit_code(state: State, what: str) -> int:
    """The command line's exit status for a finished flow run: 0, or 1 with its state on stderr."""
    if state.is_completed():
        return 0
    print(f"{what} {state.name}: {state.message}", file=sys.stderr)
    return 1


def exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _run_cli_flow(args, overrides, root):
    return pipeline(
        stages=args.stages, preset=args.preset, device=args.device, precision=args.precision, nproc=args.nproc,
        overrides=overrides, exp_name=args.exp_name, pull=args.pull, push=args.push,
        lock_timeout=args.lock_timeout, project_dir=str(root), return_state=True,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
