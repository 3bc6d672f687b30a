"""Prefect flow `sweep`: a grid of params.yaml overrides run as DVC experiments, up to N at a time, ending with
their comparison.

    python flows/sweep.py --name cls-modes --grid cls.mode=lora,last-block,full --grid cls.lora_rank=8,16
    python flows/sweep.py --name lr --grid instruct.train.lr=5e-5,1e-4 --stages instruct-finetune --max-parallel 1
    python flows/sweep.py --name cls-modes --grid cls.mode=lora,full --pool gpu     # members on the gpu pool
    prefect deployment run sweep/cpu --param name=cls-modes --param 'grid={"cls.mode": ["lora", "full"]}'

Members: every point of the grid (`--grid KEY=V1,V2`, repeatable), each combined with each override set
(`--set-file FILE`: a YAML list of `{key: value}` mappings), with the preset's and --device/--precision/
--nproc's overrides under them. Every member's overrides are checked against params.yaml before any runs.

Each member is a DVC experiment `<name>-<values>` (e.g. `cls-modes-lora-8`), run by DVC isolated from the
workspace: `dvc exp run --temp` in a copy under .dvc/tmp/exps, sharing DVC's cache and run cache (the stages a
member does not change are restored, not rerun). Each is a Prefect task (its log, its state) and an MLflow
parent run (tags `sweep`, `sweep_member`, `dvc_exp_name`) with its stage runs nested under it. A failing
member is reported with its error and the others go on. Rerunning the same sweep on the same commit skips the
members DVC already holds as experiments (`dvc exp show`) and runs the others. Ctrl-C or a Prefect cancel stops
the running members and everything under them.

With --pool, each member is a flow run of the `pipeline` deployment on that work pool instead (one member per
free worker): the deployment's run saves and pushes its DVC experiment (`dvc exp push origin`), and the sweep
pulls it back (`dvc exp pull origin NAME`) into this checkout, so every member ends as a DVC experiment here.

The end: `scratchgpt.compare` over the completed members' parent runs writes reports/sweeps/<name>/ (table and
plots), logs it to MLflow (tag `sweep`), and attaches it to the flow run as the artifacts `sweep-summary`
(members, states, the best member by --metric) and `sweep-comparison` (the table). The workspace stays as it
was: `dvc exp apply NAME` brings a member into it. Without PREFECT_API_URL a temporary local server is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/pipeline.py: its settings, helpers and flow

import argparse
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import pipeline as pipeline_flow
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from scratchgpt import compare
from scratchgpt import orchestration as orch
from scratchgpt import sweep as sw
from scratchgpt.plumbing import tracking
from scratchgpt.plumbing.params import ParamsError, read_params

SUMMARY_KEY = "sweep-summary"
TABLE_KEY = "sweep-comparison"
REPORTS = Path("reports") / "sweeps"
COMPLETED, FAILED, DONE_BEFORE, NOT_RUN = "completed", "failed", "done before", "not run"
_LIVE: set[int] = set()  # pids of the members' commands now running (stopped when the sweep is)
_LIVE_LOCK = threading.Lock()


class MemberFailed(RuntimeError):
    """A member's DVC experiment (or its flow run on a pool) did not complete."""


# ---------------------------------------------------------------------------------------------
# Members


@task(cache_policy=NO_CACHE, retries=0)
def run_member(name: str, changes: dict[str, Any], targets: list[str], root: str, sweep: str) -> dict[str, Any]:
    """`dvc exp run --temp -n NAME -S KEY=VALUE... TARGETS` under an MLflow parent run of its own, whose id the
    stages' runs nest under (DVC hands the environment on to the experiment's copy)."""
    logger = get_run_logger()
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *_set_args(changes), *targets]
    start = time.monotonic()
    params = {"sweep": sweep, "member": name, "override": {k: orch.yaml_value(v) for k, v in changes.items()}}
    tags = {**_member_tags(sweep, name), "prefect_flow_run_url": pipeline_flow.flow_run_url()}
    with tracking.pipeline_run("sweep", params, run_name=f"sweep {sweep} · {name}", tags={k: v for k, v in tags.items()
                               if v}, tracking_uri=pipeline_flow.tracking_uri_of(Path(root))) as run:  # fmt: skip
        logger.info("$ %s", " ".join(cmd))
        returncode, tail = orch.stream_command(cmd, root, pipeline_flow.stage_env(run.child_env()),
                                               lambda line: logger.info("%s", line), started=_track)  # fmt: skip
        if returncode != 0:
            raise MemberFailed(f"member {name}: `dvc exp run` exited with {returncode}: "
                               f"{pipeline_flow.error_line(tail)}")  # fmt: skip
        run_id = run.run_id
    wall = time.monotonic() - start
    logger.info("member %s completed in %.1f s", name, wall)
    return {"member": name, "state": COMPLETED, "wall_time_s": wall, "mlflow_run_id": run_id}


@task(cache_policy=NO_CACHE, retries=0)
def run_member_on_pool(
    name: str,
    changes: dict[str, Any],
    targets: list[str],
    root: str,
    sweep: str,
    deployment: str,
    job_variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A flow run of `deployment` (the pipeline on a work pool's worker) with the member's overrides, saved and
    pushed as DVC experiment NAME; then `dvc exp pull origin NAME` here."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    start = time.monotonic()
    parameters = {"overrides": changes, "exp_name": name, "push": True, "stages": targets or None,
                  "mlflow_tags": _member_tags(sweep, name)}  # fmt: skip
    logger.info("member %s: a flow run of %s", name, deployment)
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True, flow_run_name=name,
                              job_variables=job_variables)  # fmt: skip
    if not flow_run.state.is_completed():
        raise MemberFailed(f"member {name}: flow run {flow_run.name} of {deployment} ended "
                           f"{flow_run.state.name}: {flow_run.state.message}")  # fmt: skip
    cmd = ["dvc", "exp", "pull", "--force", "origin", name]
    logger.info("$ %s", " ".join(cmd))
    returncode, tail = orch.stream_command(cmd, root, pipeline_flow.stage_env({}), lambda line: logger.info("%s", line))
    if returncode != 0:
        why = pipeline_flow.error_line(tail)
        raise MemberFailed(f"member {name}: `{' '.join(cmd)}` exited with {returncode}: {why}")
    wall = time.monotonic() - start
    return {"member": name, "state": COMPLETED, "wall_time_s": wall, "flow_run": flow_run.name}


def _set_args(changes: dict[str, Any]) -> list[str]:
    return [part for arg in orch.dvc_set_args(changes) for part in ("-S", arg)]


def _member_tags(sweep: str, name: str) -> dict[str, str]:
    return {"sweep": sweep, "sweep_member": name, "dvc_exp_name": name,
            "prefect_flow_run_id": str(runtime_flow_run.id or ""),
            "prefect_flow_run_name": runtime_flow_run.name or ""}  # fmt: skip


def _track(pid: int, running: bool) -> None:
    with _LIVE_LOCK:
        (_LIVE.add if running else _LIVE.discard)(pid)


def _stop_members() -> None:
    """Stop every member's command still running (the sweep is being stopped), and what it started: SIGINT first,
    which DVC answers by cleaning up its run (a `dvc exp run --temp` killed outright stays listed as running by
    `dvc exp show`), then SIGTERM and SIGKILL for what is left."""
    with _LIVE_LOCK:
        pids = list(_LIVE)
    for pid in pids:
        orch.stop_process_tree(pid)


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="sweep")
def sweep(
    name: str,
    grid: dict[str, list[Any]] | None = None,
    sets: list[dict[str, Any]] | None = None,
    stages: list[str] | None = None,
    preset: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    nproc: int | None = None,
    max_parallel: int = 2,
    metric: str | None = None,
    pool: str | None = None,
    job_variables: dict[str, Any] | None = None,
    project_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run the members of a sweep as DVC experiments, up to `max_parallel` at a time, then compare them.

    name: the sweep's name, the start of each member's DVC experiment name. grid: {"cls.mode": ["lora", "full"],
    ...}; sets: [{"cls.mode": "lora", "cls.lora_rank": 8}, ...] (each combined with each grid point). stages:
    the targets each member reproduces (default: the whole pipeline). preset, device, precision, nproc: as the
    pipeline flow's, under each member's overrides. metric: the comparison column naming the best member
    (default: cls.test_accuracy, or instruct.val_loss when only instruct.* keys vary). pool: run the members
    as flow runs of the pipeline deployment on this work pool; job_variables: theirs (e.g. {"env": {...}}), merged
    into the deployment's. project_dir: the checkout.
    """
    logger = get_run_logger()
    root = Path(project_dir or pipeline_flow.PROJECT_DIR).resolve()
    if max_parallel < 1:
        raise sw.SweepError(f"max_parallel must be >= 1, got {max_parallel}")
    hardware = pipeline_flow.hardware_params(device, precision, nproc)
    orch.select_stages(orch.read_stages(root), stages)  # unknown stages: an error before anything runs
    targets = list(stages or [])
    members = sw.plan(root, name, sw.expand(grid or {}, sets), preset=preset, hardware=hardware)
    uri = pipeline_flow.tracking_uri_of(root)
    tracking.check_store(uri)
    deployment = _pool_deployment(pool) if pool else None
    metric = metric or sw.default_metric(members)
    params = read_params(root / "params.yaml")
    changes = {m.name: orch.resolve_overrides(params, orch.requested_overrides(root, preset, hardware, m.overrides))
               for m in members}  # fmt: skip
    done = set(sw.experiments(root, pipeline_flow.stage_env({})))
    todo = [m for m in members if m.name not in done]
    logger.info("sweep %s: %d members (%d done before: %s), %d at a time%s", name, len(members),
                len(members) - len(todo), ", ".join(m.name for m in members if m.name in done) or "none",
                max_parallel, f", on work pool {pool} ({deployment})" if pool else "")  # fmt: skip

    results = {m.name: {"member": m.name, "state": DONE_BEFORE} for m in members if m.name in done}
    try:
        with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
            futures = {}
            for m in todo:
                if deployment:
                    fn, extra = run_member_on_pool, {"deployment": deployment, "job_variables": job_variables}
                else:
                    fn, extra = run_member, {}
                task_fn = fn.with_options(name=f"member-{m.name}", task_run_name=m.name)
                arguments = {"name": m.name, "changes": changes[m.name], "targets": targets, "root": str(root),
                             "sweep": name, **extra}  # fmt: skip
                futures[m.name] = runner.submit(task_fn, parameters=arguments)
            for member, future in futures.items():
                try:
                    results[member] = future.result()
                except Exception as exc:  # reported, and the sweep goes on
                    logger.error("member %s failed: %s", member, exc)
                    results[member] = {"member": member, "state": FAILED, "error": str(exc)}
    finally:
        _stop_members()
    ordered = [{**results.get(m.name, {"member": m.name, "state": NOT_RUN}), "overrides": m.describe()}
               for m in members]  # fmt: skip
    member_params = {m.name: sw.with_overrides(params, changes[m.name]) for m in members}
    compared = targets or [s.name for s in orch.read_stages(root)]
    comparison = _compare(root, name, ordered, uri, metric, member_params, compared)
    failed = [r["member"] for r in ordered if r["state"] == FAILED]
    if failed:
        raise MemberFailed(f"sweep {name}: {len(failed)} of {len(members)} members failed ({', '.join(failed)}); "
                           f"rerun the sweep to run only those{_best_note(comparison, metric)}")  # fmt: skip
    return ordered


def _pool_deployment(pool: str) -> str:
    """`pipeline/<name>` of the pipeline deployment whose work pool is `pool`; SweepError if there is none."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])))
    names = [d.name for d in found if d.work_pool_name == pool]
    if not names:
        pools = sorted({f"{d.name} ({d.work_pool_name})" for d in found}) or ["none"]
        raise sw.SweepError(f"no deployment of the pipeline flow on work pool {pool!r} (deployments: "
                            f"{', '.join(pools)}); `prefect --no-prompt deploy --all` from the checkout")  # fmt: skip
    return f"pipeline/{sorted(names)[0]}"


def _compare(root: Path, sweep: str, results: list[dict[str, Any]], uri: str, metric: str, member_params, stages):
    """The comparison of the completed members, as files, an MLflow run and Prefect artifacts; None when no
    member completed. `member_params`: {member: params.yaml with its overrides}; `stages`: the stages compared."""
    from mlflow import MlflowClient

    logger = get_run_logger()
    client = MlflowClient(tracking_uri=uri)
    completed = [r["member"] for r in results if r["state"] in (COMPLETED, DONE_BEFORE)]
    parents = _member_parents(client, sweep, completed)
    entries = []
    for r in results:
        parent = parents.get(r["member"])
        r["mlflow_run_id"] = parent.info.run_id if parent is not None else None
        if parent is not None:
            entry = sw.member_entry(client, r["member"], parent, stages, member_params[r["member"]])
            if entry.stages:
                entries.append(entry)
    comparison = None
    if entries:
        comparison = compare.compare(entries=entries, out=root / REPORTS / sweep, tracking_uri=uri,
                                     tags={"sweep": sweep})  # fmt: skip
        rows = {row["entry"]: row for row in comparison.rows}
        for r in results:
            r[metric] = rows.get(r["member"], {}).get(metric)
        create_table_artifact(table=[{k: v for k, v in row.items() if k != "run_ids"} for row in comparison.rows],
                              key=TABLE_KEY, description=f"sweep {sweep}: the comparison of its members")  # fmt: skip
        logger.info("comparison of %d members: %s", len(entries), root / REPORTS / sweep)
    markdown = _summary(sweep, results, metric, comparison, root)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_KEY, description=f"sweep {sweep}: members and the best")
    return comparison


def _member_parents(client, sweep: str, members: list[str]) -> dict[str, Any]:
    """{member: its latest FINISHED parent run} (tags `sweep`, `sweep_member`)."""
    exp = client.get_experiment_by_name(tracking.experiment_name())
    if not members or exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}' and attributes.status = 'FINISHED' "
                              "and tags.sweep_member IS NOT NULL and tags.pipeline IS NOT NULL",
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    found: dict[str, Any] = {}
    for run in runs:
        found.setdefault(run.data.tags["sweep_member"], run)
    return {m: found[m] for m in members if m in found}


def _summary(sweep: str, results: list[dict[str, Any]], metric: str, comparison, root: Path) -> str:
    best = sw.best(comparison.rows, metric) if comparison is not None else None
    lines = [f"# Sweep {sweep}", "", f"- **members**: {len(results)}",
             f"- **best by {metric}** ({'lowest' if sw.lower_is_better(metric) else 'highest'}): "
             + (f"{best['entry']} ({best[metric]:.4g})" if best else "none (no completed member has it)"),
             f"- **comparison**: {root / REPORTS / sweep / compare.MARKDOWN_FILE}"
             + (f", MLflow run {comparison.run_id}" if comparison is not None and comparison.run_id else ""),
             f"- **bring a member into the workspace**: `dvc exp apply {best['entry'] if best else 'NAME'}`", "",
             f"| member | overrides | state | {metric} | wall time | MLflow parent run |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        value = r.get(metric)
        wall = r.get("wall_time_s")
        lines.append(f"| {r['member']} | `{r['overrides']}` | {r['state']}{': ' + r['error'] if r.get('error') else ''}"
                     f" | {'' if value is None else f'{value:.4g}'} | {'' if wall is None else f'{wall:.1f} s'} | "
                     f"{r.get('mlflow_run_id') or ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _best_note(comparison, metric: str) -> str:
    best = sw.best(comparison.rows, metric) if comparison is not None else None
    return f"; best so far by {metric}: {best['entry']}" if best else ""


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python flows/sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="the sweep's name: the start of its members' DVC experiments")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a params.yaml key and its values (repeatable; YAML values, or a YAML list)")  # fmt: skip
    parser.add_argument("--set-file", metavar="FILE", help="a YAML list of override sets ({key: value} each)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="what each member reproduces (default: all)")
    parser.add_argument("--preset", help="presets/<name>.yaml under each member's overrides")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="every *.device param")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], help="every *.precision param")
    parser.add_argument("--nproc", type=int, metavar="N", help="processes per training stage (torchrun)")
    parser.add_argument("--max-parallel", type=int, default=2, metavar="N", help="members at a time (default: 2)")
    parser.add_argument("--metric", help="the comparison column naming the best member (default: see above)")
    parser.add_argument("--pool", help="run the members as pipeline flow runs on this Prefect work pool")
    parser.add_argument("--job-variables", type=json.loads, metavar="JSON",
                        help="with --pool: the members' job variables (JSON), e.g. {\"env\": {...}}")  # fmt: skip
    parser.add_argument("--project", default=str(pipeline_flow.PROJECT_DIR), help="the checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max-parallel must be >= 1")
    signal.signal(signal.SIGTERM, pipeline_flow.exit_on_sigterm)
    server = pipeline_flow.boot_temporary_server()
    try:  # a bad grid or override: exit before any flow run exists
        root = Path(args.project).resolve()
        grid = sw.parse_grid(args.grid)
        sets = _read_sets(args.set_file) if args.set_file else None
        if args.stages:
            orch.select_stages(orch.read_stages(root), args.stages)
        hardware = pipeline_flow.hardware_params(args.device, args.precision, args.nproc)
        sw.plan(root, args.name, sw.expand(grid, sets), preset=args.preset, hardware=hardware)
        tracking.check_store(pipeline_flow.tracking_uri_of(root))
    except (ParamsError, sw.SweepError, orch.PipelineError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if server is not None:
        server.join()
    signal.signal(signal.SIGINT, functools.partial(_interrupted, temporary_server=server is not None))
    try:
        state = sweep(name=args.name, grid=grid, sets=sets, stages=args.stages, preset=args.preset,
                      device=args.device, precision=args.precision, nproc=args.nproc,
                      max_parallel=args.max_parallel, metric=args.metric, pool=args.pool,
                      job_variables=args.job_variables,
                      project_dir=str(root), return_state=True)  # fmt: skip
    except KeyboardInterrupt:
        _stop_members()
        print("sweep interrupted: its running members were stopped", file=sys.stderr)
        return 130
    return pipeline_flow.exit_code(state, "sweep")


def _interrupted(signum, frame, *, temporary_server: bool) -> None:
    """Ctrl-C: stop the members at once (their processes got it too, but a `dvc exp run` between stages may
    not stop). With a temporary Prefect server, Ctrl-C stopped the server as well (same process group), so the
    flow run cannot be reported any more: exit now rather than wait on its retries."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process as Python's default does
    _stop_members()
    if temporary_server:
        print("sweep interrupted: its running members were stopped", file=sys.stderr, flush=True)
        os._exit(130)
    raise KeyboardInterrupt


def _read_sets(path: str) -> list[dict[str, Any]]:
    try:
        sets = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise sw.SweepError(f"--set-file {path}: {exc}") from exc
    if not isinstance(sets, list) or not all(isinstance(s, dict) and s for s in sets):
        raise sw.SweepError(f"--set-file {path}: expected a YAML list of {{key: value}} mappings")
    return sets


if __name__ == "__main__":
    sys.exit(main())
