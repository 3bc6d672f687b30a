"""Sweeps: a grid of params.yaml overrides run as DVC experiments, side by side, ending with a comparison.

    python flows/sweep.py --name cls-modes --grid cls.mode=lora,last-block,full --grid cls.lora_rank=8,16

The Prefect flow is `flows/sweep.py`; this module is the part without Prefect: the grid read and expanded,
the members named and every member's overrides checked before anything runs, the members DVC already holds
as experiments of the baseline (a rerun skips them), and the best member by a metric of the comparison.

A member is one set of overrides. Its DVC experiment is named `<sweep>-<values>` (`cls-modes-lora-8`), so a
rerun of the same sweep on the same baseline commit finds the members that completed (`dvc exp show`) and
runs only the others.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scratchgpt import compare
from scratchgpt import orchestration as orch
from scratchgpt.plumbing import tracking
from scratchgpt.plumbing.params import ParamsError, parse_yaml, read_params
from scratchgpt.presets import apply_preset, yaml_value

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
"""A sweep's name: the start of every member's DVC experiment name (a git ref)."""
MAX_MEMBER_NAME = 100
CLS_METRIC = "cls.test_accuracy"
INSTRUCT_METRIC = "instruct.val_loss"
LOWER_IS_BETTER = ("loss", "perplexity", "wall_time", "_s")


class SweepError(ValueError):
    """A sweep that cannot run as asked (the message says why), found before any member runs."""


@dataclass(frozen=True)
class Member:
    """One member of a sweep: its DVC experiment name and the overrides it runs with."""

    name: str
    overrides: dict[str, Any]

    def describe(self) -> str:
        """`cls.mode=lora cls.lora_rank=8`, as `dvc exp run -S` takes them."""
        return " ".join(orch.dvc_set_args(self.overrides))


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """`["cls.mode=lora,full", "cls.lora_rank=[8, 16]"]` -> `{"cls.mode": ["lora", "full"], "cls.lora_rank":
    [8, 16]}`: comma-separated values, or a YAML list; each value read as YAML (as `dvc exp run -S` does)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise SweepError(f"grid {item!r}: expected KEY=V1,V2,... e.g. cls.mode=lora,full")
        try:
            values = parse_yaml(text) if text.startswith("[") else [parse_yaml(v.strip()) for v in text.split(",")]
        except yaml.YAMLError as exc:
            raise SweepError(f"grid {item!r}: a value is not valid YAML: {exc}") from exc
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid {item!r}: no values")
        if key in grid:
            raise SweepError(f"grid {key}: given twice; list all its values in one --grid")
        if len({yaml_value(v) for v in values}) != len(values):
            raise SweepError(f"grid {item!r}: a value is repeated")
        grid[key] = values
    return grid


def expand(grid: Mapping[str, Sequence[Any]], sets: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The members' overrides: every point of `grid` (the last key varying fastest), each combined with each of
    `sets` (an override set's keys win). Only a grid: its points; only sets: the sets."""
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
    return [{**point, **dict(s)} for s in (sets or [{}]) for point in points]


def check_name(sweep: str) -> str:
    if not NAME.match(sweep):
        raise SweepError(f"sweep name {sweep!r}: 1-40 letters, digits, - or _, starting with a letter or digit")
    return sweep


def member_names(sweep: str, overrides: Sequence[Mapping[str, Any]]) -> list[Member]:
    """`<sweep>-<value>-<value>...` per member (the values of the keys that vary between members, in order;
    shortened with the member's number where too long); SweepError when two members are the same."""
    check_name(sweep)
    seen: dict[str, int] = {}
    for i, o in enumerate(overrides):
        key = json.dumps({k: yaml_value(v) for k, v in sorted(o.items())})
        if key in seen:
            raise SweepError(f"members {seen[key] + 1} and {i + 1} have the same overrides: {key}")
        seen[key] = i
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    varying = [k for k in keys if len({yaml_value(o.get(k)) for o in overrides}) > 1] or keys
    members = []
    for i, o in enumerate(overrides, 1):
        name = "-".join([sweep, *(_slug(o[k]) for k in varying if k in o)]) if varying else f"{sweep}-{i}"
        if len(name) > MAX_MEMBER_NAME:
            name = f"{name[: MAX_MEMBER_NAME - 6]}-m{i:03d}"
        members.append(Member(name, dict(o)))
    names = [m.name for m in members]
    if len(set(names)) != len(names):  # values that slug alike ("1e-3" and 0.001): number them
        members = [Member(f"{m.name}-m{i:03d}", m.overrides) for i, m in enumerate(members, 1)]
    return members


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", yaml_value(value)).strip("._-") or "x"


def plan(
    root: str | os.PathLike[str],
    sweep: str,
    overrides: Sequence[Mapping[str, Any]],
    *,
    preset: str | None = None,
    hardware: Mapping[str, Any] | None = None,
) -> list[Member]:
    """The named members, each member's overrides (with the preset's and the hardware's) checked against
    params.yaml as the pipeline flow checks them; SweepError or ParamsError naming the member otherwise."""
    if not overrides or overrides == [{}]:
        raise SweepError("a sweep needs a grid (--grid KEY=V1,V2) or override sets")
    members = member_names(sweep, overrides)
    params = read_params(Path(root) / "params.yaml")
    for m in members:
        try:
            orch.resolve_overrides(params, orch.requested_overrides(root, preset, hardware or {}, m.overrides))
        except ParamsError as exc:
            raise ParamsError(f"member {m.name} ({m.describe()}): {exc}") from exc
    return members


def experiments(root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"params": {file: values}, "metrics": {file: values}}} of the DVC experiments whose baseline is the
    workspace's commit (`dvc exp show --json`) and that are done: not one still running or queued (`executor`), and
    not one that failed or never finished (DVC saves none)."""
    proc = subprocess.run(["dvc", "exp", "show", "--json", "--no-fetch"], cwd=root, capture_output=True, text=True,
                          env=dict(env) if env is not None else None, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        raise SweepError(f"`dvc exp show --json` failed in {root}: {proc.stderr.strip()[-500:]}")
    found: dict[str, dict[str, Any]] = {}
    for baseline in json.loads(proc.stdout or "[]"):
        for exp in baseline.get("experiments") or []:
            if exp.get("executor"):  # running, queued, or left as running by a killed `dvc exp run`
                continue
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if exp.get("name") and not rev.get("error"):
                    found[exp["name"]] = {k: _files(data.get(k)) for k in ("params", "metrics")}
    return found


def _files(section: Mapping[str, Any] | None) -> dict[str, Any]:
    return {path: (entry or {}).get("data") or {} for path, entry in (section or {}).items()}


def with_overrides(params: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml's values (nested) with `changes` (`{"cls.mode": "lora"}`) written in."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return apply_preset(dict(params), nested)


def default_metric(members: Sequence[Member]) -> str:
    """The comparison column that names the best member: the instruction model's val loss when every member
    overrides only `instruct.*` keys, else the classifier's test accuracy."""
    keys = {k for m in members for k in m.overrides}
    return INSTRUCT_METRIC if keys and all(k.startswith("instruct.") for k in keys) else CLS_METRIC


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


def best(rows: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The row (of `compare.build_table`) with the best value of `metric` (lowest for losses, perplexities and
    times, else highest); None when no row has one."""
    scored = [r for r in rows if isinstance(r.get(metric), int | float)]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=lambda r: r[metric])


def member_entry(client, name: str, parent: Any, stages: Sequence[str], params: Mapping[str, Any]) -> compare.Entry:
    """A completed member as a comparison entry: the stage runs nested under its parent run (the latest per
    stage) and, for each of `stages` that ran nothing in it (DVC found it up to date or restored it from its run
    cache), the run that made those results: `made_by`."""
    under = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'"
    nested = client.search_runs([parent.info.experiment_id], under, order_by=["attributes.start_time DESC"])
    runs: dict[str, Any] = {}
    for run in nested:
        runs.setdefault(run.data.tags.get(compare.STAGE_TAG, run.info.run_name), run)
    for stage in stages:
        if stage not in runs and (earlier := made_by(client, parent.info.experiment_id, stage, params)) is not None:
            runs[stage] = earlier
    return compare.Entry(name, "sweep", runs, parent if nested else None)


def made_by(client, experiment_id: str, stage: str, params: Mapping[str, Any]) -> Any | None:
    """The latest FINISHED run of `stage` whose logged params agree with `params` (params.yaml with a member's
    overrides) on every key both have: the run whose results DVC restored. None when there is none."""
    flat = tracking.flatten_params(params)
    runs = client.search_runs([experiment_id], f"tags.{compare.STAGE_TAG} = '{stage}' and attributes.status = "
                              "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1000)  # fmt: skip
    for run in runs:
        shared = flat.keys() & run.data.params.keys()
        if shared and all(run.data.params[k] == flat[k] for k in shared):
            return run
    return None
