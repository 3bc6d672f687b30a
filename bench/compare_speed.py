"""Speed of `scratchgpt.compare` on a store of 100 pipeline runs (target: <= 5 s to read and compare them).

Generates, in a temporary directory, an MLflow SQLite store (as the project's: `sqlite:///.../mlflow.db`,
artifacts beside it) holding `--pipelines` pipeline runs shaped like the Prefect flow's: a parent run
(tag `pipeline`, the flow's params, `time_s.<stage>` metrics) with the stage runs nested under it
(`mlflow.parentRunId`) as the stages log them: pretrain, load-gpt2, lora-cls-finetune,
instruct-finetune, evaluate, each with its params.yaml section flattened as `tracking.flatten_params`
does (values varied between pipelines: learning rate, classifier mode, seed), `runtime.*`, its final
metrics under their real names, and, for the training stages, the step-wise history the Trainer
logs (epoch, examples_seen, lr, tokens_per_s, tokens_seen, train_loss, val_loss, and the accuracies for
the classifier) at `--points` evaluations. That is about 600 runs, 40,000 params and 60,000 metric values.

Then times `compare()` in this process — selecting the runs, the table, the val-loss histories of
every training-stage run (the only histories read), the Markdown/CSV/PNG files — for the whole
experiment and for the 100 parent run ids, `--rounds` times each (the first round also imports
matplotlib), without logging the comparison run; then once with it logged; then the command line,
`python -m scratchgpt.compare`, as a fresh process (interpreter and imports included).
Writes `bench/results/compare_speed.json`.

    python bench/compare_speed.py                 # 100 pipelines (store generation takes about a minute)
    python bench/compare_speed.py --pipelines 10  # a smoke run
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from machine import machine_facts

from scratchgpt import compare
from scratchgpt.plumbing import cli, tracking
from scratchgpt.plumbing.fileio import write_json
from scratchgpt.plumbing.params import read_params

log = logging.getLogger("bench.compare_speed")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "compare_speed.json"
TARGET_S = 5.0
EXPERIMENT = "scratchgpt"
# What each stage logs as params (its params.yaml sections, as the stage scripts pass them to stage_run).
STAGE_SECTIONS = {
    "pretrain": ("pretrain", "sample"),
    "load-gpt2": ("load_gpt2",),
    "lora-cls-finetune": ("cls",),
    "instruct-finetune": ("instruct",),
    "evaluate": ("evaluate",),
}
TRAINING = {"pretrain": 50, "lora-cls-finetune": 30, "instruct-finetune": 48}  # evaluations at the default --points
HISTORY_KEYS = ("epoch", "examples_seen", "lr", "tokens_per_s", "tokens_seen", "train_loss", "val_loss")


def _final_metrics(stage: str, rng: random.Random) -> dict[str, float]:
    """The stage's final metrics under the names it logs (`final_*` for training stages)."""
    times = {"train_time_s": rng.uniform(10, 60), "session_wall_time_s": rng.uniform(12, 70),
             "session_steps": 200.0, "steps": 200.0}  # fmt: skip
    if stage == "pretrain":
        loss = rng.uniform(5.5, 7.0)
        body = {"train_loss": loss - 1, "val_loss": loss, "val_perplexity": 2.718**loss, "tokens_seen": 51200.0,
                "epochs": 10.0, "parameters": 13673984.0, "tokens_per_s": rng.uniform(900, 1400), **times}  # fmt: skip
    elif stage == "lora-cls-finetune":
        acc = rng.uniform(0.85, 0.93)
        body = {"train_accuracy": acc + 0.05, "val_accuracy": acc - 0.01, "test_accuracy": acc, "test_f1": acc,
                "test_precision": acc, "test_recall": acc, "train_loss": 0.1, "val_loss": 0.3,
                "trainable_parameters": 149536.0, "trainable_share": 0.02, "examples_seen": 5225.0,
                "examples_per_s": rng.uniform(290, 850), **times}  # fmt: skip
    elif stage == "instruct-finetune":
        body = {"train_loss": rng.uniform(2.2, 2.6), "val_loss": rng.uniform(2.5, 2.8), "tokens_seen": 180000.0,
                "tokens_per_s": rng.uniform(2800, 3200), "trainable_parameters": 13673984.0, "trainable_share": 1.0,
                "test_responses": 110.0, "response_tokens_per_s": 1100.0, "response_time_s": 4.0, **times}  # fmt: skip
    elif stage == "evaluate":
        return {"test.response_loss": rng.uniform(4.3, 4.7), "test.response_perplexity": 90.0, "test.rouge_l": 0.1,
                "test.exact_match": 0.0, "test.examples": 110.0, "test.loss_examples": 110.0,
                "test.truncated_examples": 0.0, "test.distinct_responses": 13.0, "test.empty_responses": 9.0,
                "pretrain.val_loss": 6.4, "pretrain.val_perplexity": 600.0, "cls.test_accuracy": 0.9,
                "cls.test_f1": 0.9, "instruct.train_loss": 2.4, "instruct.val_loss": 2.6}  # fmt: skip
    else:
        return {"val_loss": 6.185, "val_perplexity": 486.0, "parameters": 13673984.0, "val_windows": 8.0}
    return {f"final_{k}": v for k, v in body.items()}


def _history(stage: str, points: int, rng: random.Random) -> list[tuple[str, float, int]]:
    """(key, value, step) of every evaluation the Trainer logs for the stage."""
    keys = HISTORY_KEYS + (("train_accuracy", "val_accuracy") if stage == "lora-cls-finetune" else ())
    start, end = (0.7, 0.2) if stage == "lora-cls-finetune" else (10.5, rng.uniform(2.0, 6.5))
    out = []
    for i in range(points):
        step = 1 + i * 5
        frac = i / max(points - 1, 1)
        loss = end + (start - end) * (1 - frac) ** 2 + rng.uniform(0, 0.05)
        values = {"epoch": frac * 10, "examples_seen": step * 8.0, "lr": 5e-4 * (1 - frac), "tokens_per_s": 1000.0,
                  "tokens_seen": step * 512.0, "train_loss": loss * 0.95, "val_loss": loss,
                  "train_accuracy": 0.5 + 0.45 * frac, "val_accuracy": 0.5 + 0.4 * frac}  # fmt: skip
        out += [(k, values[k], step) for k in keys]
    return out


def _log_run(client, exp_id: str, name: str, tags: dict[str, str], params: dict[str, str],
             metrics: list[tuple[str, float, int]], start_ms: int, seconds: float) -> str:  # fmt: skip
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, start_time=start_ms, tags={"mlflow.runName": name, **tags}, run_name=name)
    rid = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), tracking.PARAMS_PER_BATCH):
        client.log_batch(rid, params=items[i : i + tracking.PARAMS_PER_BATCH])
    values = [Metric(k, v, start_ms, step) for k, v, step in metrics]
    for i in range(0, len(values), tracking.METRICS_PER_BATCH):
        client.log_batch(rid, metrics=values[i : i + tracking.METRICS_PER_BATCH])
    client.set_terminated(rid, "FINISHED", end_time=start_ms + int(seconds * 1000))
    return rid


def make_store(uri: str, pipelines: int, points: int, seed: int = 0) -> list[str]:
    """Write `pipelines` pipeline runs with their stage runs into the store at `uri`; their parent ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(client, EXPERIMENT, uri)
    base = read_params(ROOT / "params.yaml")
    rng = random.Random(seed)
    t = int(time.time() * 1000) - pipelines * 600_000
    common = {"git_commit": "0" * 40, "git_dirty": "false", "scratchgpt_version": "0.1.0", "preset": "cpu",
              "mlflow.user": "bench", "mlflow.source.type": "LOCAL"}  # fmt: skip
    parents = []
    for p in range(pipelines):
        train = {**base["pretrain"]["train"], "lr": (4e-4, 1e-3, 3e-3)[p // 3 % 3], "seed": 100 + p}
        params = {**base, "cls": {**base["cls"], "mode": ("lora", "last-block", "full")[p % 3]},
                  "pretrain": {**base["pretrain"], "train": train}}  # fmt: skip
        flow = {"stages": ",".join(STAGE_SECTIONS), "preset_file": "none", "device": "params.yaml", "pull": False,
                "push": False, "override": {"cls.mode": params["cls"]["mode"]}}  # fmt: skip
        durations = {s: rng.uniform(5, 90) for s in STAGE_SECTIONS}
        parent_tags = {**common, "pipeline": "pipeline", "dvc_exp_name": f"prefect-run-{p:03d}"}
        times = [(f"time_s.{s}", d, 0) for s, d in durations.items()]
        parent = _log_run(client, exp_id, f"pipeline run-{p:03d}", parent_tags, tracking.flatten_params(flow), times,
                          t, sum(durations.values()) + 12)  # fmt: skip
        start = t + 5000
        for stage, sections in STAGE_SECTIONS.items():
            stage_params = tracking.flatten_params({s: params[s] for s in sections})
            metrics = [(k, v, 200) for k, v in _final_metrics(stage, rng).items()]
            if stage in TRAINING:
                stage_params.update({"runtime.world_size": "1", "runtime.effective_batch_size": "8",
                                     "runtime.device": "cpu", "runtime.resumed_from_step": "null"})  # fmt: skip
                metrics += _history(stage, TRAINING[stage] * points // 50 or 1, rng)
            tags = {**common, "dvc_stage": stage, "mlflow.parentRunId": parent, "mlflow.source.name": f"stages/{stage}"}
            _log_run(client, exp_id, stage, tags, stage_params, metrics, start, durations[stage])
            start += int(durations[stage] * 1000) + 500
        parents.append(parent)
        t += 600_000
    return parents


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _rounds(label: str, rounds: int, fn) -> dict[str, Any]:
    seconds, phases, result = [], [], None
    for _ in range(rounds):
        s, result = _timed(fn)
        seconds.append(s)
        phases.append({k: round(v, 3) for k, v in result.timings.items()})
    log.info("%s: %s s (%d entries, %d curves)", label, ", ".join(f"{s:.2f}" for s in seconds),
             len(result.entries), sum(len(c) for c in result.curves.values()))  # fmt: skip
    return {"seconds_first": round(seconds[0], 3), "seconds_median": round(statistics.median(seconds), 3),
            "all_seconds": [round(s, 3) for s in seconds], "phases": phases, "entries": len(result.entries),
            "differing_params": len(result.differing), "curves": sum(len(c) for c in result.curves.values()),
            "files": [f.name for f in result.files]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--pipelines", type=int, default=100, help="pipeline runs in the store (default: 100)")
    parser.add_argument("--points", type=int, default=50, help="pretrain evaluations per run (others scaled)")
    parser.add_argument("--rounds", type=int, default=3, help="timed comparisons per selection")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    cli.setup_logging()
    with tempfile.TemporaryDirectory(prefix="compare_speed.") as tmp:
        uri = f"sqlite:///{Path(tmp) / tracking.DB_NAME}"
        gen_s, parents = _timed(lambda: make_store(uri, args.pipelines, args.points))
        log.info("generated %d pipeline runs in %.1f s", len(parents), gen_s)
        out = Path(tmp) / "compare"
        results = {
            "experiment": _rounds("whole experiment", args.rounds, lambda: compare.compare(
                experiment=EXPERIMENT, out=out, tracking_uri=uri, log_run=False)),
            "parents": _rounds(f"{len(parents)} parent ids", args.rounds, lambda: compare.compare(
                parents=parents, out=out, tracking_uri=uri, log_run=False)),
            "experiment_logged": _rounds("whole experiment, comparison run logged", 1, lambda: compare.compare(
                experiment=EXPERIMENT, out=out, tracking_uri=uri)),
        }  # fmt: skip
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, "-m", "scratchgpt.compare", "--out", str(out), "--no-log"]
        cli_s, _ = _timed(lambda: subprocess.run(cmd, env=env, capture_output=True, text=True, check=True))
        log.info("command line (fresh process): %.2f s", cli_s)
        results["command_line_s"] = round(cli_s, 3)
        counts = _store_counts(Path(tmp) / tracking.DB_NAME)
    worst = max(results[k]["seconds_median"] for k in ("experiment", "parents"))
    write_json(args.out, {
        "benchmark": "scratchgpt.compare on a generated MLflow store of pipeline runs (read, table, val-loss "
                     "histories, Markdown/CSV/PNGs)",
        "command": " ".join(["python bench/compare_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "store": {"pipelines": args.pipelines, "generation_s": round(gen_s, 1), **counts},
        "results": results, "target_s": TARGET_S, "worst_median_s": worst, "meets_target": worst <= TARGET_S,
        "machine": machine_facts(),
    })  # fmt: skip
    log.info("worst median %.2f s (target %.1f s); wrote %s", worst, TARGET_S, args.out)


def _store_counts(db: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return {f"{table}_rows": con.execute(f"select count(*) from {table}").fetchone()[0]
                for table in ("runs", "params", "tags", "metrics", "latest_metrics")}  # fmt: skip


if __name__ == "__main__":
    main()
