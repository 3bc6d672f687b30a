"""MLflow tracking for pipeline stages: one run per stage execution.

    from scratchgpt.plumbing.tracking import stage_run

    with stage_run("pretrain", params, preset="cpu", enabled=rank == 0) as run:
        run.log_metrics({"train_loss": 3.2}, step=10)
        run.log_artifact("plots/pretrain_loss.png")

Where runs go (first match wins):
- tracking URI: `MLFLOW_TRACKING_URI`, else `sqlite:///<project root>/mlflow.db` (absolute). The model
  registry is the same store, set explicitly (`MLFLOW_REGISTRY_URI`, if set, must name it too): while a
  run is open, MLflow's process-wide tracking and registry URIs (and so the environment of processes
  started meanwhile) are that store, since MLflow itself looks logged models up through them when it
  registers a version. Never a relative default that would mean a new database in DVC's temporary copy;
- project root: `SCRATCHGPT_PROJECT_ROOT`, else `DVC_ROOT` (DVC sets it to the real repository
  even for `dvc exp run --temp/--queue`), else the nearest ancestor of the cwd holding `dvc.yaml`
  and `.git` (or `.dvc`), stepping out of a `.dvc/tmp/exps/...` experiment copy, else the cwd;
- experiment: the `experiment` argument, else the parent run's experiment, else
  `SCRATCHGPT_MLFLOW_EXPERIMENT`, else "scratchgpt". A new experiment on a local store gets an
  absolute artifact location (`<store dir>/mlruns/<name>`), so runs and artifacts survive temporary
  working directories;
- parent: `SCRATCHGPT_MLFLOW_PARENT_RUN_ID` makes the run a nested child of that run (an
  orchestrating flow opens the parent with `pipeline_run` and hands `run.child_env()` to each
  stage's process). `MLFLOW_RUN_ID` is deliberately ignored: reusing a parent through it would
  mark the parent FINISHED when the child ends.
- `SCRATCHGPT_TRACKING=0` (or off/false/no) switches tracking off everywhere (a no-op run).

All logging goes through `MlflowClient` with explicit run ids, never the fluent per-thread active
run, so a `StageRun` can be used from any thread. Only one process should track (DDP rank 0): pass
`enabled=False` elsewhere to get a no-op run that imports and creates nothing.

Parallel stages (`dvc queue start --jobs N`, sweeps) share one SQLite store. Writes wait for each other:
MLflow sets SQLite's busy timeout (20 s) on every session, and a write takes milliseconds (measured: 2 and 4
processes registering at the same moment all succeed). Creating a new store's tables is not safe in
parallel (two processes doing it at once: one fails, "table experiments already exists"), so the first
open of a local SQLite store in each process holds an exclusive file lock, `<store dir>/mlruns/.<db
name>.lock`. Many machines, or many parallel writers: use a tracking server (`MLFLOW_TRACKING_URI=http://...`).

Tracking observes; it never holds a result hostage (docs/faults.md):
- `check_store` (called by every stage before any work, and by `stage_run` itself) fails within
  `CHECK_TIMEOUT_S` with one line naming the URI and the ways out when the store cannot be reached;
- every MLflow HTTP call is bounded (`HTTP_DEFAULTS`, set for this process and the ones it starts,
  unless the environment already sets them), so a server that goes away costs seconds, not minutes;
- `synchronous=False` logging (what the trainer logs while it trains) goes through a background
  thread: a failing store never stops or slows the training loop. After its first failure the thread
  stops calling the store and keeps the calls; the next synchronous call (the stage's final logging,
  after its outputs are written) retries them once;
- a call that fails raises `TrackingError`, one line saying what failed and what to do; the run's
  later calls then fail at once instead of each waiting for the store again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from scratchgpt import __version__

# Telemetry must be off before mlflow is first imported (mlflow is imported lazily, below).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
#: MLflow's HTTP client, bounded: 10 s per request, 2 retries 0-2.5 s apart (MLflow's defaults, 120 s and 7
#: retries with a doubling backoff, wait about four minutes on a server that is down). MLflow reads them at
#: each request; a value already in the environment wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"
ENV_EXPERIMENT = "SCRATCHGPT_MLFLOW_EXPERIMENT"
ENV_PARENT_RUN_ID = "SCRATCHGPT_MLFLOW_PARENT_RUN_ID"
ENV_PROJECT_ROOT = "SCRATCHGPT_PROJECT_ROOT"
ENV_TRACKING_SWITCH = "SCRATCHGPT_TRACKING"
#: A JSON object of tags for every run this process opens (an orchestrator's, e.g. the Prefect flow run's URL).
ENV_RUN_TAGS = "SCRATCHGPT_MLFLOW_TAGS"
DEFAULT_EXPERIMENT = "scratchgpt"
#: Tag of the runs `scratchgpt.compare` logs its outputs to; such runs are never compared themselves.
COMPARISON_TAG = "scratchgpt_comparison"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlruns"

# MLflow's limits (mlflow.utils.validation); kept here so importing this module stays cheap.
MAX_PARAM_VALUE_LEN = 6000
MAX_KEY_LEN = 250
MAX_TAG_VALUE_LEN = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_TRUNCATED = "...[truncated]"
_DVC_EXPS_PARTS = (".dvc", "tmp", "exps")
_OFF = {"0", "false", "off", "no"}
CHECK_TIMEOUT_S = 10.0
"""Longest wait of `check_store` for a tracking server (5 s to connect, 5 s for the answer)."""
FLUSH_TIMEOUT_S = 60.0
"""Longest wait for the background logging to drain at the end of a run before it counts as failed."""
WAYS_OUT = (
    f"start the tracking server, point {ENV_TRACKING_URI} at one that runs, or set {ENV_TRACKING_SWITCH}=0 "
    "to run without tracking"
)


STAGE_ADVICE = (
    "the outputs written so far are kept, and the stage fails so that DVC records no run that MLflow lacks. "
    f"Start the tracking server (or point {ENV_TRACKING_URI} at one that runs, or set {ENV_TRACKING_SWITCH}=0) "
    "and rerun the stage: it reuses what it finished (a finished checkpoint, the judge's scores)"
)


class TrackingError(RuntimeError):
    """The tracking store cannot be used: unreachable, failing, or a parent run or experiment it lacks."""


# ---------------------------------------------------------------------------------------------
# Where runs go


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The project's root directory (absolute), where the default MLflow store lives.

    `SCRATCHGPT_PROJECT_ROOT` wins, then `DVC_ROOT`, then the nearest ancestor of `start` (default:
    the cwd) holding `dvc.yaml` and `.git` or `.dvc`; a `.dvc/tmp/exps/...` copy made by `dvc exp
    run --temp/--queue` resolves to the repository that holds it. Falls back to `start` itself.
    """
    override = os.environ.get(ENV_PROJECT_ROOT)
    if override:
        return Path(override).expanduser().resolve()
    here = Path(start if start is not None else os.getcwd()).resolve()
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and Path(dvc_root).is_dir() and start is None:
        return _outside_dvc_exps(Path(dvc_root).resolve())
    for cand in (here, *here.parents):
        if (cand / "dvc.yaml").is_file() and ((cand / ".git").exists() or (cand / ".dvc").is_dir()):
            return _outside_dvc_exps(cand)
    return _outside_dvc_exps(here)


def _outside_dvc_exps(path: Path) -> Path:
    """Map a path inside `<repo>/.dvc/tmp/exps/<tmpdir>/...` to `<repo>`; other paths unchanged."""
    parts = path.parts
    n = len(_DVC_EXPS_PARTS)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == _DVC_EXPS_PARTS:
            return Path(*parts[:i])
    return path


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's SQLite store as an absolute URI.

    A relative SQLite path in the environment is made absolute (against the cwd, as MLflow would
    resolve it), so it means the same store when handed on to a child process in another directory.
    """
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return _absolute(uri)
    return f"sqlite:///{project_root() / DB_NAME}"


def _absolute(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute against the cwd (as MLflow would resolve it)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = uri[len("sqlite:///") :]
        if db and db != ":memory:":
            return f"sqlite:///{Path(db).expanduser().absolute()}"
    return uri


def check_registry_uri(uri: str) -> None:
    """Raise ValueError when `MLFLOW_REGISTRY_URI` is set to another store than the tracking store `uri`.

    The stages log a model to their run and register it from there: the registry must be the same store.
    """
    registry = os.environ.get(ENV_REGISTRY_URI)
    if registry and not _same_store(registry, uri):
        raise ValueError(
            f"{ENV_REGISTRY_URI}={registry} is not the tracking store {uri}: the pipeline registers its models in "
            f"the store that holds their runs. Unset {ENV_REGISTRY_URI}, or set it and {ENV_TRACKING_URI} to one URI"
        )


def _same_store(a: str, b: str) -> bool:
    if _absolute(a) == _absolute(b):
        return True
    db = _sqlite_path(a)
    return db is not None and db == _sqlite_path(b)


@contextlib.contextmanager
def use_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs (and their environment variables, for subprocesses) set
    to `uri` inside the block, put back afterwards. MLflow's SQL registry looks a logged model up through the
    process-wide tracking URI when it registers a version (`models:/<model id>`): unset, that is a relative
    `sqlite:///mlflow.db` in the cwd, another (new, empty) database in DVC's temporary copy."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {name: os.environ.get(name) for name in (ENV_TRACKING_URI, ENV_REGISTRY_URI)}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_name(experiment: str | None = None) -> str:
    """`experiment`, else `SCRATCHGPT_MLFLOW_EXPERIMENT`, else "scratchgpt"."""
    return experiment or os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT


def tracking_enabled() -> bool:
    """False when `SCRATCHGPT_TRACKING` is 0/false/off/no."""
    return os.environ.get(ENV_TRACKING_SWITCH, "1").strip().lower() not in _OFF


def check_store(uri: str | None = None, *, enabled: bool = True, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise TrackingError (one line: the URI, why, and the ways out) unless the store at `uri` (default:
    `tracking_uri()`) answers; a server gets at most `timeout` seconds and no retry. Does nothing when
    tracking is off (`SCRATCHGPT_TRACKING=0`) or `enabled` is False (DDP ranks other than 0)."""
    if not (enabled and tracking_enabled()):
        return
    uri = uri or tracking_uri()
    import mlflow.utils.rest_utils  # noqa: F401  # imported before the clock starts: the wait is the store's

    started = time.monotonic()
    try:
        if urlparse(uri).scheme in ("http", "https"):
            _probe_server(uri, timeout)
        elif _local_store_dir(uri) is not None:
            _check_local_store(uri)
        else:  # a database server
            _client(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(
            f"MLflow tracking store {uri} is not reachable ({describe_failure(exc)}, after "
            f"{time.monotonic() - started:.1f} s): {WAYS_OUT}"
        ) from exc


def _probe_server(uri: str, timeout: float) -> None:
    """One bounded request to the server's REST API (MLflow's own HTTP client: its auth and TLS settings). The
    client here is a bare one: making it sends nothing, where `_client` would already call the server, with
    retries."""
    from mlflow import MlflowClient
    from mlflow.utils.rest_utils import http_request

    creds = MlflowClient(tracking_uri=uri)._tracking_client.store.get_host_creds()
    response = http_request(creds, "/api/2.0/mlflow/experiments/search", "POST", json={"max_results": 1},
                            max_retries=0, timeout=(timeout / 2, timeout / 2))  # fmt: skip
    if response.status_code != 200:
        raise TrackingError(f"HTTP {response.status_code} {response.reason}: {response.text[:200]}")


def _check_local_store(uri: str) -> None:
    """A local store needs a directory it may write (made if missing) and, once it exists, a writable file;
    nothing is created here."""
    store_dir = _local_store_dir(uri)
    assert store_dir is not None
    existing = next(p for p in (store_dir, *store_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{existing} is not a directory this process may write")
    db = Path(unquote(uri[len("sqlite:///") :])) if uri.startswith("sqlite:///") else None
    if db is not None and db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise PermissionError(f"{db} is not writable")


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed tracking call: "connection refused", "timed out", "HTTP 503", ..."""
    text = " ".join(str(exc).split())
    for needles, reason in (
        (("Connection refused",), "connection refused"),
        (("NameResolutionError", "Name or service not known", "Failed to resolve"), "host name not resolved"),
        (("timed out", "Timeout"), "timed out"),
        (("Network is unreachable", "No route to host"), "network unreachable"),
        (("too many 5", "error responses"), "the server keeps answering with errors"),
    ):
        if any(needle in text for needle in needles):
            return reason
    if re.match(r"HTTP \d{3}\b", text):  # our own probe's words
        return _truncate(text, 300)
    status = re.search(r"error code (\d{3})", text)
    if status:
        return f"HTTP {status.group(1)}"
    return _truncate(f"{type(exc).__name__}: {text}", 300)


def _local_store_dir(uri: str) -> Path | None:
    """Directory of a local sqlite/file store (artifacts go beside it); None for servers."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:////abs/path.db -> path "//abs/path.db"; sqlite:///rel.db -> "/rel.db"
        db = unquote(uri[len("sqlite:///") :])
        if db in ("", ":memory:"):
            return None
        return Path(db).expanduser().resolve().parent
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" and uri:
        return Path(uri).expanduser().resolve()
    return None


def _client(uri: str):
    """A client whose tracking and registry store are both `uri`, opened (a new store's tables created) under
    `_creation_lock`."""
    from mlflow import MlflowClient

    with _creation_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the first use opens each store (MLflow caches them per URI)
        client.search_registered_models(max_results=1)
    return client


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """An exclusive lock (flock, dropped by the kernel if the process dies) on `<store dir>/mlruns/.<db>.lock`
    for a local SQLite store: two processes creating a new store's tables at once fail. Nothing for others."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    lock = db.parent / ARTIFACTS_DIR / f".{db.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute); None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    db = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return None if db in ("", ":memory:") else Path(db).expanduser().resolve()


def ensure_experiment(client, name: str, uri: str) -> str:
    """Id of experiment `name`, creating it (with an absolute artifact location on local stores).

    The experiment is marked as model training (`EXPERIMENT_KIND_TAG`, so MLflow's UI opens it on its runs,
    not on its GenAI overview) and given the saved view `RUNS_VIEW_ID`; an experiment made before either
    existed gets them now, without overriding a kind or a view someone set since.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        store_dir = _local_store_dir(uri)
        location = None
        if store_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
            location = (store_dir / ARTIFACTS_DIR / safe).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=experiment_tags())
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another process created it first
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} ({uri}) is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another name"
        )
    for key, value in experiment_tags().items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


# MLflow's UI reads this experiment tag to choose its layout; "custom_model_development" opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs list (MLflow's *Views* menu; `run_url` links it): the columns that tell the stage
# runs apart. Stored as the experiment tag `mlflow.sharedViewState.<id>` in the UI's own format.
RUNS_VIEW_ID = "scratchgpt-runs"
RUNS_VIEW_NAME = "scratchgpt: stages and headline metrics"
RUNS_VIEW_COLUMNS = (
    "tags.`dvc_exp_name`",
    "params.`cls.mode`",
    "params.`instruct.method`",
    "metrics.`final_val_loss`",
    "metrics.`final_test_accuracy`",
    "metrics.`final_test_f1`",
    "metrics.`test.rouge_l`",
)


def experiment_tags() -> dict[str, str]:
    """The tags every experiment of the project gets: its kind (model training) and the saved runs view."""
    name_column = "attributes.`Run Name`"  # wide enough for `stage_run_name`'s names
    state = {"selectedColumns": list(RUNS_VIEW_COLUMNS), "columnOrder": [name_column, *RUNS_VIEW_COLUMNS],
             "columnWidths": {name_column: 400}}  # fmt: skip
    now = int(time.time() * 1000)
    view = {"name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, f"mlflow.sharedViewState.{RUNS_VIEW_ID}": json.dumps(view)}


# MLflow 3.17's UI shows an experiment as GenAI or model training by its sidebar switch (remembered per browser,
# GenAI at first), whatever the experiment's kind; this query parameter picks model training for the page.
UI_MODEL_TRAINING = "workflowType=machine_learning"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None, *, view: bool = False) -> str | None:
    """The MLflow UI's page of a run, or of the experiment's runs (`view`: in the saved view `RUNS_VIEW_ID`),
    opened as model training, when `uri` is a tracking server (http/https: it serves the UI); None for a
    local store."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    page = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
    if run_id:
        return f"{page}/{run_id}?{UI_MODEL_TRAINING}"
    return f"{page}?viewStateShareKey={RUNS_VIEW_ID}&{UI_MODEL_TRAINING}" if view else f"{page}?{UI_MODEL_TRAINING}"


# ---------------------------------------------------------------------------------------------
# Params and tags


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings/dataclasses to `{"a.b": "value"}` with MLflow-safe string values.

    Strings stay as they are; other values are JSON (`true`, `null`, `[1, 2]`). Values longer than
    MLflow's limit are truncated with a marker (the full params are also logged as `params.json`).
    """
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping or dataclass, got {type(params).__name__}")
    out: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{full}."))
            continue
        if len(full) > MAX_KEY_LEN:
            raise ValueError(f"param key {full!r} is longer than MLflow's {MAX_KEY_LEN} characters")
        out[full] = _truncate(_param_str(value), MAX_PARAM_VALUE_LEN)
    return out


def _param_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value, default=str)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _jsonable(value: Any) -> Any:
    """Plain JSON-able data from (nested) dataclasses, mappings, sequences and paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# What `dvc repro` / `dvc exp run` write themselves (paths relative to the DVC project root, where
# stages run): changes there do not make the code differ from the commit. params.yaml is logged as
# MLflow params.
DVC_WRITTEN_PATHS = ("dvc.lock", "params.yaml", "metrics", "plots", "data", "models", "reports", "*.dvc")


def git_info(cwd: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """`{"git_commit": sha, "git_dirty": "true"|"false"}` for the checkout at `cwd`; {} without git.

    `git_dirty` means "the code differs from the commit": a tracked file under `cwd` (the project
    root) is modified, other than the files DVC writes on every `dvc repro` / `dvc exp run`
    (`DVC_WRITTEN_PATHS`: dvc.lock, params.yaml, metrics/, plots/, data/, models/, reports/, *.dvc).
    Untracked files do not count.
    """
    excludes = [f":(exclude){path}" for path in DVC_WRITTEN_PATHS]
    try:
        sha = _git(["rev-parse", "HEAD"], cwd)
        status = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", *excludes], cwd)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha.strip(), "git_dirty": "true" if status.strip() else "false"}


def _git(args: list[str], cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10).stdout


def _default_tags(stage_tag: dict[str, str], preset: str | None) -> dict[str, str]:
    tags = {**_env_tags(), **stage_tag, "scratchgpt_version": __version__}
    if preset is not None:
        tags["preset"] = preset
    git = git_info()
    tags.update(git)
    if "git_commit" in git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _env_tags() -> dict[str, str]:
    """The tags in `SCRATCHGPT_MLFLOW_TAGS` (a JSON object); {} when unset, a warning when malformed."""
    text = os.environ.get(ENV_RUN_TAGS, "").strip()
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        log.warning("%s is not a JSON object of tags; ignored: %.200s", ENV_RUN_TAGS, text)
        return {}
    return {str(k): _param_str(v) for k, v in tags.items()}


def stage_run_name(stage: str, details: Sequence[str] = (), preset: str | None = None) -> str:
    """A stage run's name, telling it from the other runs of the stage at a glance: the stage, what
    distinguishes the run (`details`, e.g. "lora r16"), the preset, and the DVC experiment it belongs to
    (`DVC_EXP_NAME`), e.g. `lora-cls-finetune · lora r16 · preset cpu · exp cls-lora`."""
    parts = [stage, *(d for d in details if d)]
    if preset:
        parts.append(f"preset {preset}")
    if os.environ.get("DVC_EXP_NAME"):
        parts.append(f"exp {os.environ['DVC_EXP_NAME']}")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# Runs


class StageRun:
    """One MLflow run; every call logs to it by id (safe from any thread).

    A disabled run (`StageRun.disabled()`) has `run_id = None` and ignores every call. The logging
    methods take `synchronous=False` to queue the call for a background thread instead of waiting for
    the store (see the module docstring); `flush()` waits for that queue.
    """

    def __init__(
        self, client, run_id: str | None, *, tracking_uri: str | None, experiment_id: str | None, advice: str = ""
    ):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self._advice = advice or WAYS_OUT
        self._broken: TrackingError | None = None  # set once a call failed: later calls fail at once
        self._queue: queue.Queue[tuple[str, Callable[[], Any]] | None] | None = None
        self._background_error: BaseException | None = None
        self._held: list[tuple[str, Callable[[], Any]]] = []  # calls not made since the background one failed

    @classmethod
    def disabled(cls) -> StageRun:
        return cls(None, None, tracking_uri=None, experiment_id=None)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self):
        """The `MlflowClient` of this run's store (None for a disabled run), for what the methods here do not
        cover; wrap such calls in `guard`."""
        return self._client

    # -- failures ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Tracking calls in the block ("`what`": "logging metrics") fail as one TrackingError. Once one has
        failed, the block is not entered: the run's store is not waited for again."""
        if self._broken is not None:
            raise self._broken
        try:
            yield
        except TrackingError as exc:
            self._broken = exc
            raise
        except Exception as exc:
            self._broken = TrackingError(
                f"MLflow tracking at {self.tracking_uri} failed while {what} ({describe_failure(exc)}); {self._advice}"
            )
            raise self._broken from exc

    @property
    def failed(self) -> bool:
        """A call to the store failed (in the background, or one made by `guard`)."""
        return self._broken is not None or self._background_error is not None

    # -- the background queue --------------------------------------------------------------------

    def _dispatch(self, what: str, call: Callable[[], Any], synchronous: bool) -> None:
        if not synchronous:
            if self._queue is None:
                self._queue = queue.Queue()
                threading.Thread(target=self._drain, args=(self._queue,), name=f"mlflow-{self.run_id}",
                                 daemon=True).start()  # fmt: skip
            self._queue.put((what, call))
            return
        self.flush()
        with self.guard(what):
            call()

    def _drain(self, calls: queue.Queue[tuple[str, Callable[[], Any]] | None]) -> None:
        while True:
            item = calls.get()
            try:
                if item is None:
                    return
                if self._background_error is not None:
                    self._held.append(item)
                    continue
                try:
                    item[1]()
                except Exception as exc:
                    self._background_error = exc
                    self._held.append(item)
                    log.warning(
                        "MLflow tracking at %s failed while %s (%s); going on without it, and retrying the "
                        "logging once at the end of the run",
                        self.tracking_uri, item[0], describe_failure(exc),
                    )  # fmt: skip
            finally:
                calls.task_done()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait (at most `timeout` s) for the queued calls, then retry once those the store failed; raise
        TrackingError if it still fails."""
        q = self._queue
        if q is None:
            return
        deadline = time.monotonic() + timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    with self.guard("logging in the background"):
                        raise TimeoutError(f"the store did not take the queued logging within {timeout:g} s")
                q.all_tasks_done.wait(left)
        held, self._held = self._held, []
        if held:
            log.info("retrying %d MLflow call(s) that failed in the background", len(held))
        for what, call in held:
            with self.guard(what):
                call()
        self._background_error = None

    def close(self) -> None:
        """Stop the background thread (after `flush`); later `synchronous=False` calls start a new one."""
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None

    # -- logging -------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, synchronous: bool = True) -> None:
        """Log numeric metrics at `step` (MLflow's default step 0 when None)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r}: expected a number, got {value!r}") from None
            batch.append(Metric(key, number, ts, int(step or 0)))

        def call() -> None:
            for i in range(0, len(batch), METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])

        self._dispatch("logging metrics", call, synchronous)

    def log_params(self, params: Any, *, synchronous: bool = True) -> None:
        """Log a (nested) mapping or dataclass of params as flattened `a.b` keys.

        MLflow params are immutable: re-logging a key with a different value raises.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]

        def call() -> None:
            for i in range(0, len(items), PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

        self._dispatch("logging params", call, synchronous)

    def set_tags(self, tags: Mapping[str, Any], *, synchronous: bool = True) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, _truncate(_param_str(v), MAX_TAG_VALUE_LEN)) for k, v in tags.items()]

        def call() -> None:
            for i in range(0, len(items), PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=items[i : i + PARAMS_PER_BATCH])

        self._dispatch("setting tags", call, synchronous)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file (or a whole directory's contents) into the run's artifacts."""
        if not self.enabled:
            return
        p = Path(path)
        if p.is_dir():
            self._dispatch(f"logging {p}", lambda: self._client.log_artifacts(self.run_id, str(p), artifact_path), True)
        elif p.is_file():
            self._dispatch(f"logging {p}", lambda: self._client.log_artifact(self.run_id, str(p), artifact_path), True)
        else:
            raise FileNotFoundError(f"artifact to log not found: {p}")

    def log_text(self, text: str, artifact_file: str, *, synchronous: bool = True) -> None:
        if self.enabled:
            self._dispatch(f"logging {artifact_file}", lambda: self._client.log_text(self.run_id, text, artifact_file),
                           synchronous)  # fmt: skip

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Log `d` as a JSON (or YAML, by `artifact_file`'s extension) artifact."""
        if self.enabled:
            data = _jsonable(d)
            self._dispatch(f"logging {artifact_file}", lambda: self._client.log_dict(self.run_id, data, artifact_file),
                           True)  # fmt: skip

    def child_env(self) -> dict[str, str]:
        """Environment for a subprocess whose `stage_run` should nest under this run."""
        if not self.enabled:
            return {}
        with self.guard("reading the experiment"):
            exp = self._client.get_experiment(self.experiment_id)
        return {
            ENV_TRACKING_URI: self.tracking_uri,
            ENV_REGISTRY_URI: self.tracking_uri,
            ENV_EXPERIMENT: exp.name,
            ENV_PARENT_RUN_ID: self.run_id,
        }


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Any,
    *,
    preset: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    enabled: bool = True,
    tags: Mapping[str, Any] | None = None,
    details: Sequence[str] = (),
) -> Iterator[StageRun]:
    """Open one MLflow run for one execution of DVC stage `stage`; end it when the block exits.

    Logs `params` (mapping or dataclass, flattened to `a.b` keys; the full params also as the
    `params.json` artifact) and tags `dvc_stage`, `preset`, `git_commit`, `git_dirty`,
    `scratchgpt_version` (and those of `SCRATCHGPT_MLFLOW_TAGS`). Named by `stage_run_name` (with
    `details`) unless `run_name` is given. Nests under `SCRATCHGPT_MLFLOW_PARENT_RUN_ID` when set. An
    exception in the block ends the run FAILED (KILLED for Ctrl-C) and propagates. `enabled=False` (e.g.
    on DDP ranks other than 0) or `SCRATCHGPT_TRACKING=0` yields a no-op run.
    """
    name = run_name or stage_run_name(stage, details, preset)
    with _run({"dvc_stage": stage}, params, preset, experiment, name, enabled, tags, advice=STAGE_ADVICE) as run:
        yield run


@contextlib.contextmanager
def pipeline_run(
    name: str,
    params: Any,
    *,
    preset: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    enabled: bool = True,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[StageRun]:
    """A parent run for an orchestrated pipeline; pass `run.child_env()` to each stage's process.

    `tracking_uri` (default: `tracking_uri()`) names the store when the orchestrator does not run in
    the project directory.
    """
    with _run({"pipeline": name}, params, preset, experiment, run_name or name, enabled, tags, tracking_uri) as run:
        yield run


@contextlib.contextmanager
def comparison_run(
    name: str,
    params: Any,
    *,
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[StageRun]:
    """A run holding a comparison of other runs (`scratchgpt.compare`), tagged `COMPARISON_TAG` so that
    comparisons leave it out."""
    with _run({COMPARISON_TAG: "true"}, params, None, experiment, name, True, tags, tracking_uri) as run:
        yield run


@contextlib.contextmanager
def _run(
    kind_tag, params, preset, experiment, run_name, enabled, extra_tags, uri=None, advice=""
) -> Iterator[StageRun]:
    if not (enabled and tracking_enabled()):
        yield StageRun.disabled()
        return
    run = _start(kind_tag, params, preset, experiment, run_name, extra_tags, uri, advice)
    with use_store(run.tracking_uri):
        try:
            yield run
        except KeyboardInterrupt:
            _end(run, "KILLED", "KeyboardInterrupt")
            raise
        except BaseException as exc:
            _end(run, "FAILED", f"{type(exc).__name__}: {exc}")
            raise
        _end(run, "FINISHED", None)


def _start(kind_tag, params, preset, experiment, run_name, extra_tags, uri=None, advice="") -> StageRun:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    if os.environ.get("MLFLOW_RUN_ID"):
        log.warning("MLFLOW_RUN_ID is set and ignored; nest stage runs with %s instead", ENV_PARENT_RUN_ID)
    uri = _absolute(uri) if uri else tracking_uri()
    check_registry_uri(uri)
    check_store(uri)
    client = _client(uri)
    with StageRun(client, None, tracking_uri=uri, experiment_id=None, advice=advice).guard("creating the run"):
        parent_id = os.environ.get(ENV_PARENT_RUN_ID) or None
        parent = _parent_run(client, parent_id, uri) if parent_id else None
        if experiment is None and parent is not None:
            exp_id = parent.info.experiment_id
        else:
            exp_id = ensure_experiment(client, experiment_name(experiment), uri)

        tags = _default_tags(kind_tag, preset)
        tags[MLFLOW_RUN_NAME] = run_name
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent_id
        tags = {**_context_tags(tags), **tags, **(extra_tags or {})}
        created = client.create_run(
            exp_id, tags={k: _truncate(str(v), MAX_TAG_VALUE_LEN) for k, v in tags.items()}, run_name=run_name
        )
    run = StageRun(client, created.info.run_id, tracking_uri=uri, experiment_id=exp_id, advice=advice)
    try:
        if params is not None:
            run.log_params(params)
            run.log_dict(params, "params.json")
    except BaseException as exc:
        _end(run, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    log.info(
        "MLflow run %s (%s) in experiment %s at %s%s",
        run.run_id,
        run_name,
        exp_id,
        uri,
        f", nested under {parent_id}" if parent else "",
    )
    return run


def _parent_run(client, parent_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(f"{ENV_PARENT_RUN_ID}={parent_id}: no such MLflow run in {uri}") from exc
    if parent.info.lifecycle_stage != "active":
        raise TrackingError(f"{ENV_PARENT_RUN_ID}={parent_id}: the parent run is deleted")
    if parent.info.status != "RUNNING":
        log.warning("parent MLflow run %s is %s, not RUNNING", parent_id, parent.info.status)
    return parent


def _context_tags(user_tags: dict[str, str]) -> dict[str, str]:
    """MLflow's own default tags (user, source name/type), as the fluent `start_run` adds them."""
    try:
        from mlflow.tracking.context import registry

        return dict(registry.resolve_tags(user_tags))
    except Exception as exc:  # tags are a nicety; never fail a stage over them
        log.debug("could not resolve MLflow context tags: %s", exc)
        return {}


def _end(run: StageRun, status: str, error: str | None) -> None:
    """Flush the run's logging and mark it `status`; TrackingError if that fails for a FINISHED run. Ending
    it otherwise (the block raised), a failing store only gets a warning: it must not mask the block's error,
    and is not waited for again once it failed."""
    try:
        if status != "FINISHED" and run.failed:
            log.warning("MLflow run %s is not marked %s: its store failed", run.run_id, status)
            return
        run.flush(FLUSH_TIMEOUT_S if status == "FINISHED" else 5.0)
        if error:
            run.set_tags({"error": error})
        with run.guard("ending the run"):
            run._client.set_terminated(run.run_id, status=status)
    except Exception as exc:
        if status == "FINISHED":
            raise
        log.warning("MLflow run %s is not marked %s: %s", run.run_id, status, describe_failure(exc))
    finally:
        run.close()
