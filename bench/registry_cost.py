"""What logging and registering the stages' models in MLflow costs: time per stage execution and disk per version.

For each of `models/spam-classifier` and `models/instruct` (the CPU preset's, by default), in a fresh
temporary SQLite store: `rounds` stage runs (`tracking.stage_run`), each calling what its stage calls
(`serving.log_classifier` / `serving.log_instruct_model`); the call is timed on its own (the first one
also creates the registered model). Then the disk one version adds to the store's artifacts, and the
time `mlflow.pyfunc.load_model("models:/NAME/VERSION")` takes and one prediction of the input example.
Results go to `bench/results/registry_cost.json`.

    python bench/registry_cost.py
    python bench/registry_cost.py --rounds 1 --classifier DIR --instruct DIR
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from machine import machine_facts

from scratchgpt.apps import serving
from scratchgpt.plumbing import cli, tracking
from scratchgpt.plumbing.fileio import write_json

log = logging.getLogger("bench.registry_cost")
RESULTS = Path("bench/results/registry_cost.json")


def measure(name: str, register, model_dir: Path, rounds: int) -> dict:
    """Time `register(run, model_dir)` in `rounds` stage runs; the disk and load time of the last version."""
    import mlflow

    seconds, version = [], None
    for _ in range(rounds):
        with tracking.stage_run(name, None) as run:
            started = time.perf_counter()
            version = register(run, model_dir)
            seconds.append(time.perf_counter() - started)
    store = Path(tracking.tracking_uri()[len("sqlite:///") :]).parent
    artifacts = next((store / "mlruns").glob(f"*/models/{version.source.rsplit('/', 1)[-1]}/artifacts"))
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    load_s = time.perf_counter() - started
    example = serving.classifier_spec().input_example if name == "lora-cls-finetune" else None
    example = example if example is not None else serving.instruct_spec(8, 0.0).input_example
    started = time.perf_counter()
    model.predict(example)
    return {
        "model_dir": str(model_dir),
        "model_dir_mb": round(_mb(model_dir), 1),
        "log_and_register_s": [round(s, 2) for s in seconds],
        "median_s": round(statistics.median(seconds), 2),
        "disk_per_version_mb": round(_mb(artifacts), 1),
        "load_model_s": round(load_s, 2),
        "predict_example_s": round(time.perf_counter() - started, 2),
    }


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--classifier", type=Path, default=Path("models/spam-classifier"), help="classifier dir")
    parser.add_argument("--instruct", type=Path, default=Path("models/instruct"), help="instruction model dir")
    parser.add_argument("--rounds", type=int, default=3, help="stage runs per model (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    cli.setup_logging()
    results = {}
    with tempfile.TemporaryDirectory(prefix="registry-cost-") as tmp:
        os.environ[tracking.ENV_TRACKING_URI] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        with tracking.stage_run("warm-up", None):  # the new store's migrations are not the stages' cost
            pass
        results["spam-classifier"] = measure(
            "lora-cls-finetune", lambda run, d: serving.log_classifier(run, d, {"test_accuracy": 0.9}),
            args.classifier, args.rounds,
        )  # fmt: skip
        results["instruct"] = measure(
            "instruct-finetune",
            lambda run, d: serving.log_instruct_model(run, d, {"val_loss": 1.0}, max_new_tokens=48, temperature=0.0),
            args.instruct, args.rounds,
        )  # fmt: skip
    for name, entry in results.items():
        log.info("%s: log + register %.2f s (median of %s), %.1f MB per version, load %.2f s", name, entry["median_s"],
                 entry["log_and_register_s"], entry["disk_per_version_mb"], entry["load_model_s"])  # fmt: skip
    write_json(args.out, {
        "benchmark": "serving.log_classifier / log_instruct_model per stage execution (fresh SQLite store)",
        "command": "python bench/registry_cost.py",
        "configs": {name: json.loads((Path(e["model_dir"]) / "config.json").read_text())["model"]
                    for name, e in results.items()},
        "machine": machine_facts(),
        "results": results,
    })  # fmt: skip
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
