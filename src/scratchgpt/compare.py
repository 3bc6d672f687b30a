"""Compare pipeline runs tracked in MLflow: the params that differ, headline metrics, loss curves.

    python -m scratchgpt.compare                                        # every run of the experiment
    python -m scratchgpt.compare --dvc-exp cls-lora cls-last-block cls-full   # DVC experiments by name
    python -m scratchgpt.compare --parent RUN_ID RUN_ID                 # pipeline (Prefect flow) runs
    python -m scratchgpt.compare --dvc-exp a b --out /tmp/cmp --no-log

What is compared: *entries*, one row each, made of stage runs (tag `dvc_stage`):
- a pipeline run: a parent run (`tracking.pipeline_run`, opened by flows/pipeline.py, or any run given
  with --parent) and the stage runs nested under it (tag `mlflow.parentRunId`);
- a DVC experiment: the stage runs `dvc exp run` made for it (tag `dvc_exp_name`, from DVC's
  `DVC_EXP_NAME`), or a pipeline run saved as that experiment by the flow;
- in a whole experiment, also every other stage run on its own.
Only FINISHED stage runs count; for a stage run more than once in one entry the latest counts.

Outputs, in --out (default reports/compare/, replaced as a whole): comparison.md and comparison.csv
(per entry: the params that differ, the headline metrics each stage logs to MLflow, each class's test F1 of a
classifier on your own labels, wall time, throughput, MLflow run ids), val_loss_<stage>.png (the step-wise
validation loss of each entry, overlaid, per training stage) and cls_accuracy.png (classifier test accuracy
by fine-tuning mode).
The table is also printed. Unless --no-log, the outputs are logged as artifacts of a new MLflow run
tagged `scratchgpt_comparison` (never compared itself). The store is `scratchgpt.plumbing.tracking`'s
(MLFLOW_TRACKING_URI, else the project's mlflow.db; --tracking-uri overrides it).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchgpt.plumbing import cli, fileio, plots, tracking

log = logging.getLogger(__name__)

STAGE_TAG = "dvc_stage"
PIPELINE_TAG = "pipeline"
DVC_EXP_TAG = "dvc_exp_name"
PARENT_TAG = "mlflow.parentRunId"
DEFAULT_OUT = Path("reports") / "compare"
MARKDOWN_FILE = "comparison.md"
CSV_FILE = "comparison.csv"
ACCURACY_PNG = "cls_accuracy.png"
CURVE_KEY = "val_loss"
CURVE_STAGES = ("pretrain", "lora-cls-finetune", "instruct-finetune")
CLS_STAGE = "lora-cls-finetune"
SEARCH_PAGE = 10_000
HISTORY_THREADS = 8
MAX_LEGEND = 12  # more curves than this get no legend (the table names them)
MAX_BARS = 20  # more classifier runs than this are shown as one bar per mode
MISSING = "—"
Curves = dict[str, dict[str, list[tuple[int, float]]]]  # stage -> entry label -> (step, value) points


class CompareError(ValueError):
    """Nothing to compare, or a selection that matches nothing (the message says what)."""


@dataclass(frozen=True)
class Headline:
    """One headline column: a stage run's final metric (or param)."""

    column: str
    stage: str
    key: str
    param: bool = False


HEADLINES = (
    Headline("pretrain.val_loss", "pretrain", "final_val_loss"),
    Headline("pretrain.val_perplexity", "pretrain", "final_val_perplexity"),
    Headline("pretrain.tokens_per_s", "pretrain", "final_tokens_per_s"),
    Headline("cls.mode", CLS_STAGE, "cls.mode", param=True),
    Headline("cls.test_accuracy", CLS_STAGE, "final_test_accuracy"),
    Headline("cls.test_f1", CLS_STAGE, "final_test_f1"),
    Headline("cls.test_macro_f1", CLS_STAGE, "final_test_macro_f1"),
    Headline("cls.examples_per_s", CLS_STAGE, "final_examples_per_s"),
    Headline("instruct.val_loss", "instruct-finetune", "final_val_loss"),
    Headline("instruct.tokens_per_s", "instruct-finetune", "final_tokens_per_s"),
    Headline("test.response_loss", "evaluate", "test.response_loss"),
    Headline("test.rouge_l", "evaluate", "test.rouge_l"),
    Headline("test.exact_match", "evaluate", "test.exact_match"),
    Headline("judge.mean_score", "evaluate", "judge.mean_score"),
)
WALL_TIME = "wall_time_s"
CLASS_F1 = re.compile(r"^final_test_class\.(.+)\.f1$")
"""A classifier run's per-class test F1 (data other than the book's): a column `cls.f1[<class>]` each."""


@dataclass
class Entry:
    """One compared row: stage runs by stage, and the pipeline run holding them (if any)."""

    label: str
    kind: str  # "pipeline", "dvc-exp" or "run"
    stages: dict[str, Any]  # stage -> mlflow Run
    parent: Any = None

    @property
    def runs(self) -> list[Any]:
        return ([self.parent] if self.parent is not None else []) + list(self.stages.values())

    @property
    def start_ms(self) -> int:
        return min(r.info.start_time or 0 for r in self.runs)

    def params(self) -> dict[str, str]:
        """Every stage run's params; run-local ones (`runtime.*`) and the pipeline run's are prefixed."""
        out: dict[str, str] = {}
        if self.parent is not None:
            out.update({f"pipeline.{k}": v for k, v in self.parent.data.params.items()})
        for stage, run in self.stages.items():
            out.update({f"{stage}.{k}" if k.startswith("runtime.") else k: v for k, v in run.data.params.items()})
        return out

    def wall_time_s(self) -> float | None:
        """The pipeline run's duration, else the sum of the stage runs' durations."""
        runs = [self.parent] if self.parent is not None else list(self.stages.values())
        spans = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time and r.info.start_time]
        return sum(spans) if spans else None


@dataclass
class Comparison:
    """What `compare` found: the entries, the columns of their table, and the plotted curves."""

    entries: list[Entry]
    differing: list[str]  # param keys whose values differ between entries
    headlines: list[str]  # headline columns some entry has a value for
    rows: list[dict[str, Any]]
    curves: Curves = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return ["entry", "kind", *self.differing, *self.headlines, "run_ids"]


# ---------------------------------------------------------------------------------------------
# Selecting runs


def _search(client, experiment_ids: Sequence[str], filter_string: str = "") -> list[Any]:
    """Every active run of the experiments matching `filter_string` (all pages), comparison runs left out."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string, max_results=SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return [r for r in runs if tracking.COMPARISON_TAG not in r.data.tags]


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no MLflow experiment {name!r} in {uri} (experiments there: {', '.join(known) or 'none'})")
    return exp.experiment_id


def _latest_by_stage(runs: Iterable[Any]) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        latest[run.data.tags[STAGE_TAG]] = run
    return latest


def _group(runs: Sequence[Any], parent_ids: Iterable[str] | None = None) -> list[Entry]:
    """Entries from runs: each parent with its nested stage runs, each DVC experiment's stage runs, and
    the other stage runs one by one. Parents default to the runs tagged `pipeline`."""
    by_id = {r.info.run_id: r for r in runs}
    if parent_ids is None:
        parent_ids = [rid for rid, r in by_id.items() if PIPELINE_TAG in r.data.tags]
    parents = {rid: by_id[rid] for rid in parent_ids if rid in by_id}
    children: dict[str, list[Any]] = defaultdict(list)
    experiments: dict[str, list[Any]] = defaultdict(list)
    lone: list[Any] = []
    for run in runs:
        tags = run.data.tags
        if STAGE_TAG not in tags or run.info.status != "FINISHED" or run.info.run_id in parents:
            continue
        if tags.get(PARENT_TAG) in parents:
            children[tags[PARENT_TAG]].append(run)
        elif tags.get(DVC_EXP_TAG):
            experiments[tags[DVC_EXP_TAG]].append(run)
        else:
            lone.append(run)
    entries = [
        Entry(p.data.tags.get(DVC_EXP_TAG) or p.info.run_name or rid, "pipeline", _latest_by_stage(children[rid]), p)
        for rid, p in parents.items()
    ]
    entries += [Entry(name, "dvc-exp", _latest_by_stage(rs)) for name, rs in experiments.items()]
    for run in lone:
        stage = run.data.tags[STAGE_TAG]
        entries.append(Entry(f"{stage} {run.info.run_id[:8]}", "run", {stage: run}))
    return entries


def _children(client, parents: Sequence[Any]) -> list[Any]:
    """The runs nested under `parents` (one search over their experiments)."""
    if not parents:
        return []
    exp_ids = sorted({p.info.experiment_id for p in parents})
    wanted = {p.info.run_id for p in parents}
    nested = _search(client, exp_ids, f"tags.`{PARENT_TAG}` IS NOT NULL")
    return [r for r in nested if r.data.tags.get(PARENT_TAG) in wanted]


def select_experiment(client, experiment: str, uri: str) -> list[Entry]:
    """Every entry of MLflow experiment `experiment`, oldest first."""
    entries = [e for e in _group(_search(client, [_experiment_id(client, experiment, uri)])) if e.stages]
    if not entries:
        raise CompareError(f"MLflow experiment {experiment!r} in {uri} holds no finished stage runs to compare")
    return sorted(entries, key=lambda e: e.start_ms)


def select_parents(client, parent_ids: Sequence[str], uri: str) -> list[Entry]:
    """One entry per parent run id (in that order), with the stage runs nested under it."""
    ids = list(dict.fromkeys(parent_ids))
    bad = [i for i in ids if not i.isalnum()]
    if bad:
        raise CompareError(f"not MLflow run ids: {', '.join(bad)}")
    all_exps = [e.experiment_id for e in client.search_experiments()]
    quoted = ", ".join(f"'{i}'" for i in ids)
    parents = _search(client, all_exps, f"attributes.run_id IN ({quoted})") if all_exps else []
    missing = [i for i in ids if i not in {p.info.run_id for p in parents}]
    if missing:
        raise CompareError(f"no MLflow run {', '.join(missing)} in {uri}")
    grouped = _group([*parents, *_children(client, parents)], ids)
    by_id = {e.parent.info.run_id: e for e in grouped if e.parent is not None}
    empty = [i for i in ids if not by_id[i].stages]
    if empty:
        raise CompareError(f"MLflow run(s) {', '.join(empty)} in {uri} have no finished stage runs nested under them")
    return [by_id[i] for i in ids]


def select_dvc_experiments(client, names: Sequence[str], experiment: str, uri: str) -> list[Entry]:
    """One entry per DVC experiment name (in that order): the runs tagged with it, or the pipeline run
    saved as it with its stage runs."""
    names = list(dict.fromkeys(names))
    tagged = _search(client, [_experiment_id(client, experiment, uri)], f"tags.{DVC_EXP_TAG} IS NOT NULL")
    matched = [r for r in tagged if r.data.tags[DVC_EXP_TAG] in names]
    parents = [r for r in matched if PIPELINE_TAG in r.data.tags]
    entries: dict[str, Entry] = {}
    for entry in _group([*matched, *_children(client, parents)]):
        if entry.stages and entry.label in names:
            entries.setdefault(entry.label, entry)  # a pipeline run (grouped first) wins
    missing = [n for n in names if n not in entries]
    if missing:
        known = sorted({r.data.tags[DVC_EXP_TAG] for r in tagged})
        raise CompareError(
            f"no finished stage runs tagged {DVC_EXP_TAG}={', '.join(missing)} in MLflow experiment {experiment!r} "
            f"({uri}); DVC experiments with runs there: {', '.join(known) or 'none'}"
        )
    return [entries[n] for n in names]


def _unique_labels(entries: list[Entry]) -> None:
    counts = defaultdict(int)
    for e in entries:
        counts[e.label] += 1
    for e in entries:
        if counts[e.label] > 1:
            e.label = f"{e.label} {e.runs[0].info.run_id[:8]}"


# ---------------------------------------------------------------------------------------------
# The table


def differing_params(entries: Sequence[Entry]) -> tuple[list[str], list[dict[str, str]]]:
    """The param keys whose present values differ between entries (sorted), and each entry's params.

    A param only some entries have (their stage did not run) differs only if those values differ.
    """
    params = [e.params() for e in entries]
    values: dict[str, set[str]] = defaultdict(set)
    for p in params:
        for k, v in p.items():
            values[k].add(v)
    return sorted(k for k, vs in values.items() if len(vs) > 1), params


def headline_values(entry: Entry) -> dict[str, Any]:
    """The entry's headline metrics (and `cls.mode`) by column, each class's test F1 (`cls.f1[<class>]`, for
    classifiers of more than the book's two classes), plus its wall time; absent ones left out."""
    out: dict[str, Any] = {}
    for h in HEADLINES:
        run = entry.stages.get(h.stage)
        if run is None:
            continue
        source = run.data.params if h.param else run.data.metrics
        if h.key in source:
            out[h.column] = source[h.key]
    cls = entry.stages.get(CLS_STAGE)
    for key, value in sorted(cls.data.metrics.items()) if cls is not None else ():
        match = CLASS_F1.match(key)
        if match:
            out[f"cls.f1[{match.group(1)}]"] = value
    wall = entry.wall_time_s()
    if wall is not None:
        out[WALL_TIME] = wall
    return out


def build_table(entries: list[Entry]) -> Comparison:
    """Rows of the comparison: label, kind, differing params, headline metrics, MLflow run ids."""
    differing, params = differing_params(entries)
    values = [headline_values(e) for e in entries]
    per_class = sorted({c for v in values for c in v if c.startswith("cls.f1[")})
    order = [h.column for h in HEADLINES] + per_class + [WALL_TIME]
    headlines = [c for c in order if c not in differing and any(c in v for v in values)]
    rows = []
    for entry, p, v in zip(entries, params, values, strict=True):
        row: dict[str, Any] = {"entry": entry.label, "kind": entry.kind}
        row.update({k: p.get(k) for k in differing})
        row.update({c: v.get(c) for c in headlines})
        row["run_ids"] = " ".join(r.info.run_id for r in entry.runs)
        rows.append(row)
    return Comparison(entries, differing, headlines, rows)


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return MISSING
    if not isinstance(value, float):
        return str(value)
    if column.endswith(("accuracy", "exact_match")):
        return f"{value:.2%}"
    if column.endswith(("_per_s", "_s")):
        return f"{value:,.1f}"
    return f"{value:.4g}"


def to_markdown(comparison: Comparison) -> str:
    """The table as GitHub Markdown (pipes in values escaped)."""
    cols = comparison.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in comparison.rows:
        cells = [_fmt(c, row[c]).replace("|", "\\|").replace("\n", " ") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(comparison: Comparison) -> str:
    """The table as CSV: full-precision numbers, empty cells where a value is absent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(comparison.columns)
    for row in comparison.rows:
        writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                         for c in comparison.columns])  # fmt: skip
    return buf.getvalue()


def to_text(comparison: Comparison, max_cell: int = 40) -> str:
    """The table for a terminal, without the run ids: a line per entry, or, when there are fewer entries
    than columns, a line per column and a column per entry. Numbers are right-aligned."""
    cols = comparison.columns[:-1]
    grid = [[c, *(_fmt(c, row[c])[:max_cell] for row in comparison.rows)] for c in cols]  # a line per column
    if len(comparison.rows) >= len(cols):
        grid = [list(line) for line in zip(*grid, strict=True)]  # a line per entry
        numeric = [all(isinstance(r[c], int | float) or r[c] is None for r in comparison.rows) for c in cols]
    else:
        numeric = [False] + [True] * len(comparison.rows)
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    return "\n".join([fmt(grid[0]), fmt(["-" * w for w in widths]), *(fmt(line) for line in grid[1:])]) + "\n"


# ---------------------------------------------------------------------------------------------
# Curves and plots


def fetch_curves(client, entries: Sequence[Entry], key: str = CURVE_KEY) -> Curves:
    """`key`'s step-wise history for every entry's training-stage run that logged it, by stage and label.

    Only those histories are read (the runs' latest metrics say which exist), one request per run, in
    threads: a tracking server answers them concurrently (on SQLite, threads neither help nor hurt: 300
    histories take about 0.45 s either way, bench/compare_speed.py's store).
    """
    wanted = [(stage, e.label, e.stages[stage].info.run_id) for stage in CURVE_STAGES for e in entries
              if stage in e.stages and key in e.stages[stage].data.metrics]  # fmt: skip
    with ThreadPoolExecutor(max_workers=HISTORY_THREADS) as pool:
        histories = pool.map(lambda w: client.get_metric_history(w[2], key), wanted)
        curves: Curves = defaultdict(dict)
        for (stage, label, _), history in zip(wanted, histories, strict=True):
            curves[stage][label] = sorted((m.step, m.value) for m in history)
    return dict(curves)


def plot_curves(curves: Curves, out_dir: Path) -> list[Path]:
    """One PNG per stage: each entry's validation loss against the optimizer step, overlaid."""
    paths = []
    for stage, by_label in curves.items():
        steps = sorted({s for points in by_label.values() for s, _ in points})
        series = {f"s{i}": dict(points) for i, points in enumerate(by_label.values())}
        rows = [{"step": s, **{k: pts.get(s) for k, pts in series.items()}} for s in steps]
        labels = dict(zip(series, by_label, strict=True))
        paths.append(plots.plot_metric(
            rows, out_dir / f"{CURVE_KEY}_{stage}.png", x_key="step", series=list(series), ylabel="Validation loss",
            xlabel="Optimizer step", title=f"{stage}: validation loss ({len(series)} runs)", labels=labels,
            legend_loc="upper right" if len(series) <= MAX_LEGEND else None, figsize=(6.5, 4),
        ))  # fmt: skip
    return paths


def plot_accuracy(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Classifier test accuracy by fine-tuning mode: a bar per entry with a classifier run, coloured by
    mode; with more than MAX_BARS such entries, a bar per mode (the mean, whiskers from min to max)."""
    rows = sorted((r for r in comparison.rows if r.get("cls.test_accuracy") is not None),
                  key=lambda r: str(r.get("cls.mode")))  # fmt: skip
    if not rows:
        return []
    title = "Classifier test accuracy by mode"
    modes = [str(r.get("cls.mode") or "?") for r in rows]
    if len(rows) <= MAX_BARS:
        labels, values, ranges = [r["entry"] for r in rows], [r["cls.test_accuracy"] for r in rows], None
    else:
        by_mode: dict[str, list[float]] = defaultdict(list)
        for mode, row in zip(modes, rows, strict=True):
            by_mode[mode].append(row["cls.test_accuracy"])
        modes = list(by_mode)
        labels = [f"{m}\n({len(v)} runs)" for m, v in by_mode.items()]
        values = [sum(v) / len(v) for v in by_mode.values()]
        ranges = [(min(v), max(v)) for v in by_mode.values()]
        title += " (mean, min-max)"
    path = plots.plot_bars(labels, values, out_dir / ACCURACY_PNG, groups=modes, ylabel="Test accuracy",
                           title=title, ranges=ranges)  # fmt: skip
    return [path]


# ---------------------------------------------------------------------------------------------
# The whole comparison


def compare(
    *,
    experiment: str | None = None,
    parents: Sequence[str] | None = None,
    dvc_exps: Sequence[str] | None = None,
    out: str | os.PathLike[str] = DEFAULT_OUT,
    tracking_uri: str | None = None,
    log_run: bool = True,
    tags: dict[str, str] | None = None,
    entries: Sequence[Entry] | None = None,
) -> Comparison:
    """Select runs (parent run ids, else DVC experiment names, else the whole experiment), build the
    table and plots into `out` (replaced as a whole), and log them to a comparison run (`log_run`).

    `experiment` (default: `tracking.experiment_name()`) is searched for DVC experiments and as a whole;
    parent runs are found in any experiment, and the comparison run goes to the first parent's.

    Raises CompareError when nothing matches, before anything is written.
    """
    if parents and dvc_exps:
        raise CompareError("compare parent runs or DVC experiments, not both")
    out_dir = _check_out(Path(out))
    uri = tracking_uri or tracking.tracking_uri()
    experiment = tracking.experiment_name(experiment)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if entries is not None:
        if not entries:
            raise CompareError("no entries to compare")
        entries = list(entries)
        experiment = client.get_experiment(entries[0].runs[0].info.experiment_id).name
    elif parents:
        entries = select_parents(client, parents, uri)
        experiment = client.get_experiment(entries[0].parent.info.experiment_id).name
    elif dvc_exps:
        entries = select_dvc_experiments(client, dvc_exps, experiment, uri)
    else:
        entries = select_experiment(client, experiment, uri)
    _unique_labels(entries)
    timings["select_s"] = time.perf_counter() - t0
    comparison = build_table(entries)
    t1 = time.perf_counter()
    comparison.curves = fetch_curves(client, entries)
    timings["curves_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    comparison.files = _write(comparison, out_dir)
    timings["write_s"] = time.perf_counter() - t2
    if log_run:
        t3 = time.perf_counter()
        comparison.run_id = _log(comparison, out_dir, experiment, uri, tags or {}, parents=parents, dvc_exps=dvc_exps)
        timings["log_s"] = time.perf_counter() - t3
    comparison.timings = timings
    return comparison


def _check_out(out: Path) -> Path:
    """`out`, refused if it is a directory holding something other than an earlier comparison."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKDOWN_FILE).is_file())):
        raise CompareError(f"--out {out}: exists and is not an earlier comparison's directory (no {MARKDOWN_FILE})")
    return out


def _write(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Every output, built in a temporary directory that then replaces `out_dir`."""
    with fileio.atomic_dir(out_dir) as tmp:
        (tmp / MARKDOWN_FILE).write_text(_markdown_report(comparison), encoding="utf-8")
        (tmp / CSV_FILE).write_text(to_csv(comparison), encoding="utf-8")
        pngs = plot_curves(comparison.curves, tmp) + plot_accuracy(comparison, tmp)
        names = [MARKDOWN_FILE, CSV_FILE, *(p.name for p in pngs)]
    return [out_dir / n for n in names]


def _markdown_report(comparison: Comparison) -> str:
    pngs = [f"{CURVE_KEY}_{s}.png" for s in comparison.curves]
    if any(r.get("cls.test_accuracy") is not None for r in comparison.rows):
        pngs.append(ACCURACY_PNG)
    return "\n".join([
        f"# Comparison of {len(comparison.entries)} runs", "",
        f"Params that differ: {', '.join(f'`{k}`' for k in comparison.differing) or 'none'}.", "",
        to_markdown(comparison), *(f"![{p}]({p})\n" for p in pngs),
    ])  # fmt: skip


def _log(
    comparison: Comparison, out_dir: Path, experiment: str, uri: str, extra_tags: dict[str, str], **selection: Any
) -> str | None:
    chosen = {k: ",".join(v) for k, v in selection.items() if v} or {"experiment": experiment}
    ids = " ".join(r.info.run_id for e in comparison.entries for r in e.runs)
    name = f"comparison of {len(comparison.entries)}"
    tags = {**extra_tags, "compared_runs": ids}
    with tracking.comparison_run(name, {"compare": chosen}, experiment=experiment, tags=tags, tracking_uri=uri) as run:
        run.log_metrics({"entries": len(comparison.entries)})
        run.log_artifact(out_dir)
        return run.run_id


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--experiment", help=f"MLflow experiment to search (default: ${tracking.ENV_EXPERIMENT} or "
                                        f"{tracking.DEFAULT_EXPERIMENT!r})")  # fmt: skip
    select = p.add_mutually_exclusive_group()
    select.add_argument("--parent", nargs="+", metavar="RUN_ID", help="pipeline (parent) run ids to compare")
    select.add_argument("--dvc-exp", nargs="+", metavar="NAME", help="DVC experiment names to compare")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory, replaced (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the project's store)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    args = p.parse_args(argv)
    cli.setup_logging(logging.WARNING)
    try:
        tracking.check_store(args.tracking_uri)  # a store that is down: one line, not minutes of retries
        result = compare(experiment=args.experiment, parents=args.parent, dvc_exps=args.dvc_exp, out=args.out,
                         tracking_uri=args.tracking_uri, log_run=not args.no_log)  # fmt: skip
    except (CompareError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(to_text(result), end="")
    print(f"\nwrote {', '.join(str(f) for f in result.files)}")
    if result.run_id:
        print(f"MLflow comparison run {result.run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
