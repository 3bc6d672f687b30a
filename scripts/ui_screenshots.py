"""Screenshots of the Prefect and MLflow UIs after a real pipeline run, for docs/img/.

    python scripts/ui_screenshots.py                   # the CPU preset
    python scripts/ui_screenshots.py --quick --keep    # fewer epochs; keep the servers' data in the temp dir

The stages take most of the time: `--quick` took 47 minutes on this project's 2 cores shared with other test
runs (load average 12 to 17), the pipeline through the flow 37 of them.

In a temporary copy of the project (git + DVC, data from $SCRATCHGPT_MIRROR) it starts `prefect server` and
`mlflow server` on 127.0.0.1, runs `python flows/pipeline.py` against both (a Prefect flow run, an MLflow parent
run with the stage runs nested), then `dvc exp run -n cls-lora -S cls.mode=lora lora-cls-finetune` and the same
for `last-block` (stage runs of their own). It checks what the pages should show through the servers' APIs and
in the pages' text, then writes, with headless Chromium (Debian: `apt-get install chromium`):

- prefect-flow-run-graph.png: the flow run's page, its graph drawn as dvc.yaml's DAG;
- prefect-summary.png: the flow run's `pipeline-summary` artifact, its MLflow runs linked;
- mlflow-training-runs.png: the experiment as the Prefect summary links it, opened on its runs;
- mlflow-run-names.png: the saved view `scratchgpt-runs`, the pipeline run expanded: a run name per stage run,
  the LoRA and last-block experiments beside the pipeline's full fine-tuning.

Everything runs offline; every process it starts is stopped by its process group.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ("dvc.yaml", "params.yaml", "prefect.yaml", ".gitignore", "stages", "src", "presets", "flows")
OFFLINE = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
# --quick: the CPU preset with fewer epochs and shorter test answers (the run names and graphs are the same).
QUICK = {"pretrain.train.epochs": 2, "cls.train.epochs": 1, "instruct.train.epochs": 1, "instruct.max_new_tokens": 8}
CLS_MODES = ("lora", "last-block")  # run as DVC experiments beside the pipeline's own (params.yaml: full)
WINDOW = (1400, 1000)


class ScreenshotError(RuntimeError):
    """A server, the pipeline or a page did not do what the screenshots should show."""


# ---------------------------------------------------------------------------------------------
# Processes and HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str], health: str, timeout: float = 180) -> Iterator[None]:
    """`cmd` running in its own process group until the block ends; `health` answering 200 first."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not _answers(health):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ScreenshotError(f"{cmd[0]} {cmd[1]} is not healthy at {health}:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield
    finally:
        _stop_group(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


def call_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ScreenshotError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# The project, the servers, the runs


def make_project(root: Path, env: dict[str, str], quick: bool) -> None:
    root.mkdir()
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, root / name)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, root, env)
    if quick:
        sets = [f"{k}={v}" for k, v in QUICK.items()]
        run([sys.executable, "-c", "import sys; from dvc.utils.hydra import apply_overrides; "
             "apply_overrides('params.yaml', sys.argv[1:])", *sets], root, env)  # fmt: skip
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "project"], root, env)


def run_pipeline(root: Path, env: dict[str, str], prefect_api: str) -> str:
    """The pipeline through the Prefect flow, then the classifier's other modes as DVC experiments; the flow run id."""
    run([sys.executable, "flows/pipeline.py"], root, env)
    (flow_run,) = call_json(f"{prefect_api}/flow_runs/filter", {"limit": 1, "sort": "START_TIME_DESC"})
    if flow_run["state_type"] != "COMPLETED":
        raise ScreenshotError(f"flow run {flow_run['name']} is {flow_run['state_type']}")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "pipeline"], root, env)
    for mode in CLS_MODES:
        run(["dvc", "exp", "run", "-n", f"cls-{mode}", "-S", f"cls.mode={mode}", "lora-cls-finetune"], root, env)
    return flow_run["id"]


def check_graph(prefect_api: str, flow_run_id: str, root: Path) -> dict[str, list[str]]:
    """{task run: its upstream task runs} from Prefect's API; ScreenshotError unless it is dvc.yaml's DAG."""
    from scratchgpt import orchestration

    expected = {k: sorted(v) for k, v in orchestration.upstream_graph(orchestration.read_stages(root)).items()}
    deadline = time.monotonic() + 30  # the flow's process reports its task runs as events: recorded a moment later
    while True:
        tasks = call_json(f"{prefect_api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        if {t["name"] for t in tasks} >= set(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = {t["id"]: t["name"] for t in tasks}
    graph = {t["name"]: sorted(names[i["id"]] for inputs in t["task_inputs"].values() for i in inputs
                               if i.get("input_type") == "task_run") for t in tasks}  # fmt: skip
    if graph != expected or graph["evaluate"] != ["instruct-finetune", "lora-cls-finetune"]:
        raise ScreenshotError(f"the flow run's graph is not the pipeline's:\n{graph}\nexpected\n{expected}")
    return graph


def check_runs(mlflow_url: str) -> tuple[str, list[str]]:
    """The experiment id and its runs' names; ScreenshotError unless it is marked as model training and its
    classifier runs are named by mode."""
    exp = call_json(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=scratchgpt")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    if tags.get("mlflow.experimentKind") != "custom_model_development":
        raise ScreenshotError(f"experiment scratchgpt is not marked as model training: {tags}")
    found = call_json(f"{mlflow_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                                   "max_results": 1000})["runs"]  # fmt: skip
    names = [r["info"]["run_name"] for r in found]
    for mode in ("lora r16", "last-block", "full"):
        if not any(n.startswith(f"lora-cls-finetune · {mode} ·") for n in names):
            raise ScreenshotError(f"no classifier run named for mode {mode!r}: {names}")
    return exp["experiment_id"], names


# ---------------------------------------------------------------------------------------------
# The browser


class Chromium:
    """Headless Chromium driven through its DevTools protocol (one page)."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect  # a dependency of Prefect

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ScreenshotError(f"{binary} did not start its DevTools server")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        page = next(t for t in call_json(f"http://127.0.0.1:{port}/json") if t["type"] == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict:
        i = next(self._ids)
        self._ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise ScreenshotError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ScreenshotError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, *texts: str, timeout: float = 60) -> None:
        """Go to `url` and wait until the page's text holds every one of `texts` (then a little more, for
        drawings and late rows)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not all(self.js(f"document.body && document.body.innerText.includes({json.dumps(t)})") for t in texts):
            if time.monotonic() > deadline:
                text = self.js("document.body ? document.body.innerText : ''") or ""
                raise ScreenshotError(f"{url} does not show {texts} after {timeout:g} s; it shows:\n{text[:1500]}")
            time.sleep(0.5)
        time.sleep(3)

    def click_all(self, selector: str) -> int:
        return self.js(f"(() => {{ const b = [...document.querySelectorAll({json.dumps(selector)})];"
                       " b.forEach(x => x.click()); return b.length; })()")  # fmt: skip

    def save(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {path}", flush=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()
        _stop_group(self.proc)


def take(browser: Chromium, out: Path, prefect_ui: str, flow_run_id: str, mlflow_url: str, exp_id: str) -> None:
    from scratchgpt.plumbing import tracking

    browser.open(f"{prefect_ui}/runs/flow-run/{flow_run_id}", "Completed", "Task Runs", "holding the checkout lock")
    browser.save(out / "prefect-flow-run-graph.png")

    (summary,) = call_json(f"{prefect_ui}/api/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["pipeline-summary"]}}})  # fmt: skip
    browser.open(f"{prefect_ui}/artifacts/artifact/{summary['id']}", "Pipeline run: COMPLETED", "MLflow runs")
    browser.save(out / "prefect-summary.png")

    browser.open(tracking.ui_url(mlflow_url, exp_id), "Runs", "pipeline ")
    if browser.js("document.body.innerText.includes('Usage') && document.body.innerText.includes('Latency')"):
        raise ScreenshotError("MLflow opened the experiment on its GenAI overview")
    browser.click_all('button[aria-label="Close"]')  # the assistant's side panel: room for the runs
    time.sleep(1)
    browser.save(out / "mlflow-training-runs.png")

    browser.open(tracking.ui_url(mlflow_url, exp_id, view=True), tracking.RUNS_VIEW_NAME[:20], "exp cls-lora")
    expanders = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'  # the [+] of a parent run (MLflow 3.17)
    browser.click_all(expanders)
    deadline = time.monotonic() + 30
    while not browser.js("document.body.innerText.includes('lora-cls-finetune · full · ')"):
        if time.monotonic() > deadline:
            raise ScreenshotError("the pipeline run's stage runs did not show under it (its [+] not found?)")
        time.sleep(0.5)
    time.sleep(2)
    browser.save(out / "mlflow-run-names.png")


# ---------------------------------------------------------------------------------------------


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise ScreenshotError("no Chromium: `apt-get install chromium` (Debian), or put chromium on PATH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (the pages look the same)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (project, stores, logs)")
    args = parser.parse_args(argv)
    try:
        binary = chromium_binary()
        if not os.environ.get("SCRATCHGPT_MIRROR"):
            raise ScreenshotError("set SCRATCHGPT_MIRROR to the data mirror (the run is offline)")
        tmp = Path(tempfile.mkdtemp(prefix="scratchgpt-ui-"))
        try:
            _screenshots(tmp, binary, args.out.resolve(), args.quick)
        finally:
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    except ScreenshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _screenshots(tmp: Path, binary: str, out: Path, quick: bool) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_ui, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SCRATCHGPT_MLFLOW"))}
    base.update(OFFLINE, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", SCRATCHGPT_MIRROR=os.environ[
        "SCRATCHGPT_MIRROR"], GIT_AUTHOR_NAME="ui", GIT_AUTHOR_EMAIL="ui@localhost", GIT_COMMITTER_NAME="ui",
        GIT_COMMITTER_EMAIL="ui@localhost")  # fmt: skip
    (tmp / "prefect").mkdir()
    (tmp / "mlflow").mkdir()
    prefect_env = {**base, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_UI_API_URL": f"{prefect_ui}/api"}
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp / "mlflow" / "artifacts")]  # fmt: skip
    root = tmp / "project"
    env = {**base, "PYTHONPATH": str(root / "src"), "PREFECT_HOME": str(tmp / "prefect-client"),
           "PREFECT_API_URL": f"{prefect_ui}/api", "MLFLOW_TRACKING_URI": mlflow_url}  # fmt: skip
    with (started(prefect_cmd, tmp / "prefect" / "server.log", prefect_env, f"{prefect_ui}/api/health"),
          started(mlflow_cmd, tmp / "mlflow" / "server.log", base, f"{mlflow_url}/health")):  # fmt: skip
        make_project(root, env, quick)
        flow_run_id = run_pipeline(root, env, f"{prefect_ui}/api")
        graph = check_graph(f"{prefect_ui}/api", flow_run_id, root)
        exp_id, names = check_runs(mlflow_url)
        print("Prefect graph:", json.dumps(graph), "\nMLflow runs:", *sorted(names), sep="\n  ")
        out.mkdir(parents=True, exist_ok=True)
        (tmp / "chromium").mkdir()
        browser = Chromium(binary, tmp / "chromium")
        try:
            take(browser, out, prefect_ui, flow_run_id, mlflow_url, exp_id)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
