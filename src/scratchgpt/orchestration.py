"""What the Prefect flows (`flows/pipeline.py`, `flows/sweep.py`) need besides Prefect: the pipeline's
stages in order, read from `dvc.yaml`; run-time overrides of `params.yaml`, checked before anything runs;
the checkout lock; the workspace kept as it was around a run with overrides; commands streamed line by
line and stopped with everything under them; DVC's verdict on a stage, read from its output; the stages'
headline metrics and the run summary.

Kept free of Prefect (cheap to import, tested on its own). No stage imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from scratchgpt.plumbing.params import ParamsError, flatten, from_dict, parse_yaml, read_params
from scratchgpt.presets import apply_preset, load_preset, validate, yaml_value

LOCK_FILE = Path(".dvc") / "tmp" / "scratchgpt-pipeline.lock"
# params.yaml as it was before a flow run wrote its overrides into it (restored when the run ends).
PARAMS_BACKUP = Path(".dvc") / "tmp" / "scratchgpt-pipeline.params.yaml"
# dvc.lock and the uncached outputs as they were before a run with overrides (restored when it ends).
BASELINE_DIR = Path(".dvc") / "tmp" / "scratchgpt-pipeline.baseline"
STOP_GRACE_S = 5.0  # how long a stopped command gets before the next, harder signal
TAIL_LINES = 60  # the last lines of a command's output kept for its error message
# Flow parameters that set every params.yaml key of that name (e.g. `pretrain.train.device`,
# `load_gpt2.device`, `cls.train.device`), so a new stage's section needs no flow change.
HARDWARE_KEYS = ("device", "precision", "nproc")
# Shown first in the summary, in this order, when a stage's metrics file has them.
HEADLINE_METRICS = (
    "test_accuracy", "test_f1", "test_macro_f1", "val_loss", "val_perplexity", "train_loss", "tokens_per_s", "tokens",
    "documents", "n_files", "total_bytes",
)  # fmt: skip
# States of a stage in a flow run.
RAN, SKIPPED, RESTORED, PULLED, FAILED, NOT_RUN = "ran", "skipped", "restored", "pulled", "failed", "not run"


class PipelineError(ValueError):
    """dvc.yaml cannot be run as a pipeline, or a stage name is unknown."""


class CheckoutBusy(RuntimeError):
    """Another pipeline flow run holds this checkout."""


# ---------------------------------------------------------------------------------------------
# Stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml, as far as ordering and reporting need it."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    """Every output path: `outs`, `metrics` and `plots` entries."""
    metrics: tuple[str, ...]
    uncached: tuple[str, ...] = ()
    """The outputs with `cache: false` (metrics, plots): git keeps them, DVC's cache does not."""


def read_stages(root: str | os.PathLike[str]) -> list[Stage]:
    """The stages of `<root>/dvc.yaml` in pipeline order: each after the stages whose outputs it depends
    on, otherwise in file order."""
    path = Path(root) / "dvc.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"cannot read {path}: {exc}") from exc
    stages = []
    for name, body in (data.get("stages") or {}).items():
        if "foreach" in body or "matrix" in body:
            raise PipelineError(f"{path}: stage {name!r} uses foreach/matrix, which the flow does not expand")
        cmd = body.get("cmd", "")
        entries = [e for key in ("outs", "metrics", "plots") for e in body.get(key) or []]
        outs = [_entry_path(e) for e in entries]
        uncached = [_entry_path(e) for e in entries if isinstance(e, Mapping) and _uncached(e)]
        stages.append(
            Stage(
                name=name,
                cmd=" && ".join(cmd) if isinstance(cmd, list) else str(cmd),
                deps=tuple(_entry_path(e) for e in body.get("deps") or []),
                outs=tuple(outs),
                metrics=tuple(_entry_path(e) for e in body.get("metrics") or []),
                uncached=tuple(uncached),
            )
        )
    return _in_order(stages, path)


def _entry_path(entry: str | Mapping[str, Any]) -> str:
    if isinstance(entry, Mapping):
        (entry,) = entry.keys()
    return os.path.normpath(str(entry))


def _uncached(entry: Mapping[str, Any]) -> bool:
    ((_, options),) = entry.items()
    return isinstance(options, Mapping) and options.get("cache") is False


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def upstream_of(stage: Stage, stages: Iterable[Stage]) -> list[Stage]:
    """The stages whose outputs `stage` depends on directly."""
    return [s for s in stages if s is not stage and any(_overlaps(d, o) for d in stage.deps for o in s.outs)]


def upstream_graph(stages: list[Stage]) -> dict[str, list[str]]:
    """{stage: the stages it comes right after}, among `stages` (in pipeline order): dvc.yaml's edges
    (outs -> deps) less those another path already implies (a transitive reduction), so that a drawing
    of it reads download -> tokenize -> ... -> evaluate rather than a web of vocab-file edges."""
    direct = {s.name: {u.name for u in upstream_of(s, stages)} for s in stages}
    ancestors: dict[str, set[str]] = {}
    for s in stages:  # pipeline order: every upstream stage is done before its downstream ones
        ancestors[s.name] = set().union(*({u, *ancestors[u]} for u in direct[s.name]))
    order = [s.name for s in stages]
    return {
        name: [u for u in order if u in ups and not any(u in ancestors[v] for v in ups - {u})]
        for name, ups in direct.items()
    }


def _in_order(stages: list[Stage], path: Path) -> list[Stage]:
    ups = {s.name: {u.name for u in upstream_of(s, stages)} for s in stages}
    done: list[Stage] = []
    names: set[str] = set()
    while len(done) < len(stages):
        ready = next((s for s in stages if s.name not in names and ups[s.name] <= names), None)
        if ready is None:
            left = sorted(s.name for s in stages if s.name not in names)
            raise PipelineError(f"{path}: the stages {left} depend on each other in a cycle")
        done.append(ready)
        names.add(ready.name)
    return done


def select_stages(stages: list[Stage], targets: Iterable[str] | None) -> list[Stage]:
    """`targets` and every stage upstream of them (as `dvc repro TARGET` runs), in pipeline order; all
    stages for None or an empty list."""
    targets = list(targets or [])
    if not targets:
        return list(stages)
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; dvc.yaml has {list(by_name)}")
    wanted: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [u.name for u in upstream_of(by_name[name], stages)]
    return [s for s in stages if s.name in wanted]


# ---------------------------------------------------------------------------------------------
# Overrides


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["pretrain.train.lr=3e-4", ...]` -> `{"pretrain.train.lr": 0.0003}` (values read as YAML, as
    `dvc exp run -S` reads them)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. pretrain.train.lr=3e-4")
        try:
            out[key.strip()] = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise ParamsError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
    return out


def hardware_overrides(
    params: Mapping[str, Any], *, device: str | None = None, precision: str | None = None, nproc: int | None = None
) -> dict[str, Any]:
    """Overrides setting every `*.device`, `*.precision` and `*.nproc` key of `params` to the value given
    (None: leave those keys alone)."""
    wanted = {"device": device, "precision": precision, "nproc": nproc}
    return {
        key: wanted[leaf]
        for key in flatten(dict(params))
        if (leaf := key.rsplit(".", 1)[-1]) in wanted and wanted[leaf] is not None
    }


def resolve_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check `overrides` (`{"section.key": value}`) against `params` and return those that change a value.

    Every key must be an existing leaf of params.yaml, and params.yaml with all overrides applied must
    validate (each section's dataclass and the cross-checks of `scratchgpt.presets.validate`); else
    ParamsError naming the key or value. Overrides equal to the current value are dropped.
    """
    flat = flatten(dict(params))
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or key not in flat:
            raise ParamsError(_unknown_key_message(key, flat))
        if isinstance(value, Mapping):
            raise ParamsError(f"override {key}: a mapping; set its keys one by one (e.g. {key}.KEY=VALUE)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamsError(f"override {key}: {value!r} is not a finite number")
        _set_nested(nested, key.split("."), value)
    _validate(apply_preset(dict(params), nested))
    return {k: v for k, v in overrides.items() if yaml_value(flat[k]) != yaml_value(v)}


def _validate(params: dict[str, Any]) -> None:
    """`scratchgpt.presets.validate`, and the two sections it leaves out (download, tokenize)."""
    from scratchgpt.data.download import DownloadParams
    from scratchgpt.pipeline.tokenize import TokenizeParams

    validate(params)
    from_dict(DownloadParams, params.get("download"), "download")
    from_dict(TokenizeParams, params.get("tokenize"), "tokenize")


def _unknown_key_message(key: Any, flat: Mapping[str, Any]) -> str:
    if isinstance(key, str) and any(k.startswith(key + ".") for k in flat):
        return f"override {key}: a section, not a value; set one of its keys (e.g. {key}.KEY=VALUE)"
    parent, _, leaf = str(key).rpartition(".")
    siblings = [k.rpartition(".")[2] for k in flat if k.rpartition(".")[0] == parent and parent]
    close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.7) if siblings else []
    if close:
        hint = f"; did you mean {' or '.join(f'{parent}.{c}' for c in close)}?"
    elif siblings:
        hint = f"; {parent} has {', '.join(siblings)}"
    else:
        close = difflib.get_close_matches(str(key), list(flat), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"override {key}: no such key in params.yaml{hint}"


def _set_nested(d: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def dvc_set_args(overrides: Mapping[str, Any]) -> list[str]:
    """`["key=literal", ...]` as `dvc exp run -S` takes them."""
    return [f"{k}={yaml_value(v)}" for k, v in overrides.items()]


def apply_overrides(params_file: str | os.PathLike[str], overrides: Mapping[str, Any]) -> None:
    """Write `overrides` into params.yaml the way `dvc exp run -S` does (DVC's own Hydra-based editor,
    which keeps comments and layout), then check the file holds exactly those values.

    On any failure the file is restored and ParamsError raised.
    """
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    path = Path(params_file)
    original = path.read_bytes()
    try:
        dvc_apply_overrides(path, dvc_set_args(overrides))
        written = flatten(read_params(path))
        wrong = [k for k, v in overrides.items() if yaml_value(written.get(k)) != yaml_value(v)]
        if wrong:
            raise ParamsError(f"{path}: after applying the overrides, {wrong} do not hold the values asked for")
    except Exception as exc:
        path.write_bytes(original)
        if isinstance(exc, ParamsError):
            raise
        raise ParamsError(f"{path}: could not apply overrides {dvc_set_args(overrides)}: {exc}") from exc


@contextlib.contextmanager
def overrides_applied(root: str | os.PathLike[str], overrides: Mapping[str, Any]) -> Iterator[None]:
    """params.yaml with `overrides` written in (`apply_overrides`) for the block, then as it was.

    The original is kept in `.dvc/tmp/scratchgpt-pipeline.params.yaml` meanwhile, so the next run
    restores it (`restore_params`) should this process be killed. Hold the checkout lock around this.
    """
    if not overrides:
        yield
        return
    params_file, backup = Path(root) / "params.yaml", Path(root) / PARAMS_BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    tmp = backup.with_suffix(".tmp")
    tmp.write_bytes(params_file.read_bytes())
    os.replace(tmp, backup)
    try:
        apply_overrides(params_file, overrides)
        yield
    finally:
        restore_params(root)


def restore_params(root: str | os.PathLike[str]) -> bool:
    """Put back the params.yaml saved by `overrides_applied`, if there is one (a run that was killed
    with its overrides applied); True if it did."""
    params_file, backup = Path(root) / "params.yaml", Path(root) / PARAMS_BACKUP
    if not backup.is_file():
        return False
    tmp = params_file.with_name(".params.yaml.restore")
    tmp.write_bytes(backup.read_bytes())
    os.replace(tmp, params_file)
    backup.unlink()
    return True


def requested_overrides(
    root: str | os.PathLike[str], preset: str | None, hardware: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """All overrides asked for, flat: presets/<preset>.yaml's, then `hardware_overrides(**hardware)`, then the
    explicit ones (later wins). Check them with `resolve_overrides`."""
    params = read_params(Path(root) / "params.yaml")
    from_preset = flatten(load_preset(preset, Path(root) / "presets")) if preset else {}
    return {**from_preset, **hardware_overrides(params, **hardware), **(overrides or {})}


@contextlib.contextmanager
def baseline_kept(root: str | os.PathLike[str], stages: Iterable[Stage]) -> Iterator[None]:
    """The workspace as it was before the block, after it: dvc.lock, and every output of `stages`.

    For a run with overrides, saved as a DVC experiment in the block: its results are the experiment's
    (`dvc exp apply NAME` brings them in), not the workspace's. Before the block, dvc.lock and the stages'
    uncached outputs (metrics, plots) are copied to `.dvc/tmp/scratchgpt-pipeline.baseline/`, with a note of
    which outputs existed; afterwards they are put back, `dvc checkout --force` brings the cached outputs back
    to the hashes of the restored dvc.lock (from DVC's cache), and outputs that did not exist are removed.
    Should this process be killed, the next run restores it (`restore_baseline`). Hold the checkout lock.
    """
    base, rootp = Path(root) / BASELINE_DIR, Path(root)
    stages = list(stages)
    if base.exists():
        shutil.rmtree(base)
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = ["dvc.lock", *(o for s in stages for o in s.uncached)]
    for rel in files:
        if (rootp / rel).exists():
            _copy(rootp / rel, tmp / "files" / rel)
    manifest = {"files": files, "outs": [o for s in stages for o in s.outs], "stages": [s.name for s in stages],
                "existed": [o for s in stages for o in ("dvc.lock", *s.outs) if (rootp / o).exists()]}  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    os.replace(tmp, base)
    try:
        yield
    finally:
        restore_baseline(root)


def restore_baseline(root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> bool:
    """Put back what `baseline_kept` saved, if anything (a run that was killed with it pending); True if it did.

    Raises RuntimeError naming what could not be restored (e.g. a cached output no longer in DVC's cache)."""
    base, rootp = Path(root) / BASELINE_DIR, Path(root)
    if not (base / "manifest.json").is_file():
        return False
    manifest = json.loads((base / "manifest.json").read_text())
    existed = set(manifest["existed"])
    for rel in manifest["files"]:
        _remove(rootp / rel)
        if rel in existed:
            _copy(base / "files" / rel, rootp / rel)
    failed = ""
    if manifest["stages"] and (rootp / "dvc.lock").is_file():
        proc = subprocess.run(["dvc", "checkout", "--force", *manifest["stages"]], cwd=rootp, capture_output=True,
                              text=True, env=dict(env) if env is not None else None)  # fmt: skip
        failed = proc.stderr.strip() if proc.returncode != 0 else ""
    for rel in manifest["outs"]:
        if rel not in existed:
            _remove(rootp / rel)
    shutil.rmtree(base)
    if failed:
        raise RuntimeError(f"could not restore the workspace's outputs (`dvc checkout --force`): {failed[-800:]}")
    return True


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def presets_of(params: Mapping[str, Any]) -> str | None:
    """The sections' `preset` names (`pretrain.preset`, `cls.preset`, ...) as one tag: "cpu", or
    "book+cpu" when they differ; None when no section names one."""
    names = sorted({str(v) for k, v in flatten(dict(params)).items() if k.count(".") == 1 and k.endswith(".preset")})
    return "+".join(names) or None


# ---------------------------------------------------------------------------------------------
# The checkout lock


@contextlib.contextmanager
def checkout_lock(
    root: str | os.PathLike[str],
    holder: Mapping[str, Any],
    timeout: float,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 0.5,
) -> Iterator[Path]:
    """Hold the pipeline lock of the checkout at `root` for the block (`.dvc/tmp/scratchgpt-pipeline.lock`).

    Waits up to `timeout` seconds for another holder (calling `on_wait(holder_info)` once), then raises
    CheckoutBusy naming it. The lock is a `flock`: the kernel drops it when its process dies, so a
    killed run never leaves a stale lock. `holder` (pid, host, flow run, ...) is written into the file
    for the messages of those who wait.
    """
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = _read_holder(path)
                if time.monotonic() >= deadline:
                    raise CheckoutBusy(
                        f"another pipeline run is using {Path(root).resolve()} ({describe_holder(other)}); waited "
                        f"{timeout:g} s for it. Let it finish or cancel it, or raise lock_timeout."
                    ) from None
                if not warned and on_wait is not None:
                    on_wait(other)
                    warned = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**holder, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: Mapping[str, Any]) -> str:
    """`flow_run NAME, flow_run_id ID, pid N, host H, since T` of a lock holder's record."""
    if not holder:
        return "holder unknown"
    parts = [f"{k} {holder[k]}" for k in ("flow_run", "flow_run_id", "pid", "host", "since") if holder.get(k)]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Commands


def stream_command(
    cmd: list[str],
    cwd: str | os.PathLike[str],
    env: Mapping[str, str],
    on_line: Callable[[str], None],
    started: Callable[[int, bool], None] | None = None,
) -> tuple[int, list[str]]:
    """Run `cmd`, handing each line of its output (stdout and stderr together; a progress bar's redraws are
    lines too) to `on_line` as it comes. Returns the exit code and the last `TAIL_LINES` lines. `started(pid,
    running)` hears of the process when it starts (True) and when it has ended (False).

    Should this be interrupted (Ctrl-C, a cancelled flow run, an exception in `on_line`), the command and
    everything it started are stopped (`stop_process_tree`) before the exception goes on.
    """
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")  # fmt: skip
    if started is not None:
        started(proc.pid, True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.rstrip("\n").split("\r"):  # progress bars redraw with \r
                if line.strip():
                    on_line(line)
                    tail = [*tail[-(TAIL_LINES - 1) :], line]
        return proc.wait(), tail
    finally:
        if proc.poll() is None:
            stop_process_tree(proc.pid)
            proc.wait()
        if started is not None:
            started(proc.pid, False)


def stop_process_tree(
    pid: int, grace: float = STOP_GRACE_S, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
) -> None:
    """Stop process `pid` and everything under it with `signals`, `grace` seconds apart, until none is left. By
    default SIGINT first (a stage sees Ctrl-C and ends its MLflow run KILLED; DVC ignores it while a stage runs),
    then SIGTERM, then SIGKILL."""
    import psutil  # a dependency of DVC

    try:
        root = psutil.Process(pid)
        alive = [*root.children(recursive=True), root]  # the children first: taken before the parent goes
    except psutil.NoSuchProcess:
        return
    for sig in signals:
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=grace)
        if not alive:
            return


# ---------------------------------------------------------------------------------------------
# DVC's verdict, metrics, summary


def stage_outcome(stage: str, output: str) -> str:
    """What `dvc repro --single-item STAGE` did, from its output: ran, skipped (up to date), restored
    (from DVC's run cache) or pulled (from the DVC remote)."""
    if f"Running stage '{stage}'" in output:
        return RAN
    if f"Stage '{stage}' is cached - skipping run" in output:
        return RESTORED
    if f"Stage '{stage}' didn't change, skipping" in output:
        return SKIPPED
    if "Pulling data for" in output:
        return PULLED
    return RAN


def headline_metrics(root: str | os.PathLike[str], stage: Stage, limit: int = 3) -> dict[str, float]:
    """Up to `limit` numbers from the stage's metrics files: `HEADLINE_METRICS` first, then any others."""
    found: dict[str, float] = {}
    for rel in stage.metrics:
        try:
            data = json.loads((Path(root) / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.update({k: v for k, v in flatten(data).items() if _is_number(v)})
    ordered = [k for k in HEADLINE_METRICS if k in found] or list(found)
    return {k: found[k] for k in ordered[:limit]}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def md_link(text: str, url: str | None) -> str:
    """`[text](url)`, or `text` when there is no URL."""
    return f"[{text}]({url})" if url else text


def _run_cell(run_id: str, url: str | None) -> str:
    """A run id, whole (to copy, e.g. for `compare --parent`), or its first 8 characters linking its page."""
    return md_link(run_id[:8], url) if url else run_id


def summary_markdown(results: list[Mapping[str, Any]], info: Mapping[str, Any]) -> str:
    """The flow run's summary: a line per fact in `info`, then a table of the stages.

    Each result: stage, state, wall_time_s, metrics ({name: number}), mlflow_run_id and mlflow_run_url
    (optional: the run's page in MLflow's UI, which the id's first 8 characters then link to).
    """
    lines = [f"# Pipeline run: {info.get('status', '?')}", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items() if k != "status" and v not in (None, "", {}, [])]
    lines += ["", "| stage | state | wall time | headline metrics | MLflow run |", "|---|---|---|---|---|"]
    for r in results:
        wall = r.get("wall_time_s")
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("metrics") or {}).items())
        lines.append(
            f"| {r['stage']} | {r['state']} | {'' if wall is None else f'{wall:.1f} s'} | {metrics} | "
            f"{_run_cell(r.get('mlflow_run_id') or '', r.get('mlflow_run_url'))} |"
        )
    return "\n".join(lines) + "\n"
