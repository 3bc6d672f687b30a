"""The pipeline's two products as MLflow models in the model registry: the classifier (`spam-classifier` for the
book's data, `cls.name` in general) and `instruct`.

    import mlflow, pandas as pd
    clf = mlflow.pyfunc.load_model("models:/spam-classifier/1")
    clf.predict(pd.DataFrame({"text": ["WINNER!! Claim your prize"]}))      # columns label, probability
    clf.predict(pd.DataFrame({"text": ["..."]}), params={"probabilities": True})  # and {class: probability}
    bot = mlflow.pyfunc.load_model("models:/instruct/1")
    bot.predict(pd.DataFrame({"instruction": ["Name a color."], "input": [""]}))   # column response

    mlflow models serve -m models:/spam-classifier/1 --env-manager local --host 127.0.0.1 --port 5001

`Classifier` and `InstructModel` are `mlflow.pyfunc.PythonModel` wrappers around our own code
(`classify.load_classifier` + `classify.label_texts`; `checkpoint.load_model` + `instruct.encode_prompt`
+ `instruct.answer_prompts`, the test responses' batched generation). The stage's model directory
(`model.safetensors`, `config.json`, the GPT-2 vocabulary) is the model's one artifact, the scratchgpt
package travels with it (`code_paths`), and its pip requirements are pinned from the installed packages
(so MLflow infers nothing in a subprocess).

`log_classifier` / `log_instruct_model` log one as a model of a stage's MLflow run and register it as the
next version of its registered model (the classifier under the name the stage gives it), with the run's
headline metrics as version tags and in the description. They do nothing for a no-op run (tracking off, DDP
ranks other than 0) or with `SCRATCHGPT_REGISTER=0`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

import scratchgpt
from scratchgpt.apps.classify import best_labels, class_probabilities, load_classifier, text_probabilities
from scratchgpt.apps.instruct import answer_prompts, encode_prompt
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn import checkpoint
from scratchgpt.plumbing.tracking import StageRun
from scratchgpt.train import distributed

log = logging.getLogger(__name__)

CLASSIFIER_NAME = "spam-classifier"
INSTRUCT_NAME = "instruct"
ENV_REGISTER = "SCRATCHGPT_REGISTER"
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
ARTIFACT = "model_dir"  # the key of the stage's model directory among the MLflow model's artifacts
# The distributions the wrappers import (scratchgpt.apps.serving and what it imports; tests/test_serving.py
# checks the list against a real load-and-predict). Pinned to the installed versions when logged.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "safetensors", "tiktoken", "tqdm", "PyYAML")
# What `metrics/cls.json` and `metrics/instruct.json` headline: the version tags and description.
CLASSIFIER_HEADLINE = ("test_accuracy", "test_f1", "test_precision", "test_recall", "test_macro_f1",
                       "test_macro_precision", "test_macro_recall", "val_accuracy")
INSTRUCT_HEADLINE = ("val_loss", "train_loss", "test_responses", "response_tokens_per_s")
# The wrappers' model_config as logged; override at load time (`mlflow.pyfunc.load_model(uri, model_config=
# {"device": "cpu"})`) or when serving (`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'`).
CLASSIFIER_CONFIG = {"device": "auto", "batch_size": 32}
INSTRUCT_CONFIG = {"device": "auto", "batch_size": 16}


class Classifier(mlflow.pyfunc.PythonModel):
    """Texts (column `text`) in; `label` (a class name from the classifier's config.json) and its
    `probability` out, as `python -m scratchgpt.classify` answers; with the request param `probabilities`
    true, also `probabilities`: every class's. model_config: `device`, `batch_size` (`CLASSIFIER_CONFIG`)."""

    def load_context(self, context) -> None:
        self.device = distributed.resolve_device(context.model_config["device"])
        self.batch_size = int(context.model_config["batch_size"])
        directory = context.artifacts[ARTIFACT]
        self.model, self.info = load_classifier(directory, self.device)
        self.tokenizer = gpt2_tokenizer(directory)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = [str(t) for t in _column(model_input, "text")]
        probs = text_probabilities(self.model, self.info, self.tokenizer, texts, batch_size=self.batch_size,
                                   device=self.device)  # fmt: skip
        out = pd.DataFrame(best_labels(self.info, probs), columns=["label", "probability"])
        if (params or {}).get("probabilities"):
            out["probabilities"] = class_probabilities(self.info, probs)
        return out


SpamClassifier = Classifier  # the name models registered before the classifier took any labels import


class InstructModel(mlflow.pyfunc.PythonModel):
    """Instructions (column `instruction`, optional `input`) in; the `response` out, as the
    instruct-finetune stage answers its test split. Params per request: `max_new_tokens`, `temperature`
    (defaults: the stage's). model_config: `device`, `batch_size` (`INSTRUCT_CONFIG`)."""

    def load_context(self, context) -> None:
        self.device = distributed.resolve_device(context.model_config["device"])
        self.batch_size = int(context.model_config["batch_size"])
        directory = context.artifacts[ARTIFACT]
        self.model = checkpoint.load_model(directory, self.device)
        self.tokenizer = gpt2_tokenizer(directory)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        instructions = _column(model_input, "instruction")
        inputs = model_input["input"] if "input" in model_input else [""] * len(instructions)
        prompts = [encode_prompt(self.tokenizer, str(i), "" if pd.isna(x) else str(x))
                   for i, x in zip(instructions, inputs, strict=True)]  # fmt: skip
        try:
            responses = answer_prompts(
                self.model, self.tokenizer, prompts, max_new_tokens=int(params.get("max_new_tokens", 256)),
                temperature=float(params.get("temperature", 0.0)), batch_size=self.batch_size,
            )  # fmt: skip
        except ValueError as exc:  # a bad max_new_tokens or temperature: the client's error, not the server's
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        return pd.DataFrame({"response": responses})


def _column(frame: Any, name: str) -> list:
    if not isinstance(frame, pd.DataFrame) or name not in frame:
        from mlflow.exceptions import MlflowException

        raise MlflowException.invalid_parameter_value(f"expected a table with a {name!r} column")
    return frame[name].tolist()


@dataclass(frozen=True)
class ModelSpec:
    """What one registered model is: its wrapper, schema, example and headline metrics."""

    name: str
    wrapper: type[mlflow.pyfunc.PythonModel]
    signature: Any
    input_example: pd.DataFrame
    config: dict[str, Any]
    headline: tuple[str, ...]
    summary: str


BOOK_EXAMPLE = ["WINNER!! You have been selected to receive a £900 prize. Call now!", "Are we still on for lunch?"]


def classifier_spec(name: str = CLASSIFIER_NAME, labels: tuple[str, ...] = ("ham", "spam"),
                    examples: list[str] | None = None) -> ModelSpec:  # fmt: skip
    """The classifier registered as `name`, answering with `labels`; `examples` (default: two SMS) show the input."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import DataType, Map

    inputs = Schema([ColSpec("string", "text")])
    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                      ColSpec(Map(DataType.double), "probabilities", required=False)])  # fmt: skip
    params = ParamSchema([ParamSpec("probabilities", "boolean", False)])
    kind = "Spam classifier" if name == CLASSIFIER_NAME else f"Classifier {name!r}"
    return ModelSpec(
        name,
        Classifier,
        ModelSignature(inputs, outputs, params),
        pd.DataFrame({"text": examples or BOOK_EXAMPLE}),
        CLASSIFIER_CONFIG,
        CLASSIFIER_HEADLINE,
        f"{kind} (scratchgpt, lora-cls-finetune): text in, label ({' | '.join(labels)}) and probability out "
        "(request param probabilities: true adds every class's).",
    )


def instruct_spec(max_new_tokens: int, temperature: float) -> ModelSpec:
    """The instruction model; requests default to the stage's `max_new_tokens` and `temperature`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens)),
                          ParamSpec("temperature", "double", float(temperature))])  # fmt: skip
    return ModelSpec(
        INSTRUCT_NAME,
        InstructModel,
        ModelSignature(inputs, Schema([ColSpec("string", "response")]), params),
        pd.DataFrame({"instruction": ["Rewrite the sentence using a simile."], "input": ["The car is very fast."]}),
        INSTRUCT_CONFIG,
        INSTRUCT_HEADLINE,
        "Instruction model (scratchgpt, instruct-finetune): instruction and optional input in, response out.",
    )


def registry_enabled() -> bool:
    """False when `SCRATCHGPT_REGISTER` is 0/false/off/no."""
    return os.environ.get(ENV_REGISTER, "1").strip().lower() not in {"0", "false", "off", "no"}


def pip_requirements() -> list[str]:
    """`name==version` of each distribution the wrappers import, as installed (local tags like +cpu
    dropped: the served model may run on another build of the same version)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_classifier(run: StageRun, model_dir: str | os.PathLike[str], metrics: Mapping[str, Any],
                   tags: Mapping[str, Any] | None = None, *, name: str = CLASSIFIER_NAME,
                   examples: list[str] | None = None) -> Any:  # fmt: skip
    """Log `model_dir` (from `classify.save_classifier`) as a model of `run` and register it as the next
    version of `name` (the book's: `spam-classifier`); the ModelVersion, or None when registering is off."""
    if not (run.enabled and registry_enabled()):
        return None
    config = Path(model_dir) / checkpoint.CONFIG_FILE
    labels = tuple(checkpoint.load_config(model_dir)["classifier"]["labels"]) if config.is_file() else ()
    return log_and_register(run, classifier_spec(name, labels, examples), model_dir, metrics, tags)


def log_instruct_model(
    run: StageRun, model_dir: str | os.PathLike[str], metrics: Mapping[str, float], *, max_new_tokens: int,
    temperature: float, tags: Mapping[str, Any] | None = None,
) -> Any:  # fmt: skip
    """Log `model_dir` (the instruct-finetune stage's model) as a model of `run` and register it as the next
    version of `instruct`; the ModelVersion, or None when registering is off."""
    return log_and_register(run, instruct_spec(max_new_tokens, temperature), model_dir, metrics, tags)


def log_and_register(run: StageRun, spec: ModelSpec, model_dir: str | os.PathLike[str],
                     metrics: Mapping[str, float], tags: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    """The MLflow model of `spec` around `model_dir`, logged to `run` and registered as a new version.

    Goes through `run`'s client (explicit run id and store, never MLflow's process-wide active run), and
    logs `registry_time_s` (what logging and registering took) to the run. A store that fails raises one
    TrackingError (`run.guard`): the model directory is already written, and a rerun registers it.
    """
    if not (run.enabled and registry_enabled()):
        return None
    missing = [n for n in (checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE) if not (Path(model_dir) / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}: no model to log as {spec.name!r}")
    run.flush()  # what the run logged in the background first: a failed store is reported before any upload
    started = time.perf_counter()
    with run.guard(f"registering the {spec.name} model"):
        version, model_id = _log_and_register(run, spec, Path(model_dir), metrics, tags)
    seconds = time.perf_counter() - started
    run.log_metrics({"registry_time_s": seconds})
    log.info("registered %s version %s (model %s) in %.1f s", spec.name, version.version, model_id, seconds)
    return version


def _log_and_register(run: StageRun, spec: ModelSpec, model_dir: Path, metrics: Mapping[str, float],
                      tags: Mapping[str, Any] | None) -> tuple[Any, str]:  # fmt: skip
    """The registered ModelVersion and the logged model's id."""
    from mlflow.entities import LoggedModelOutput

    client = run.client
    version_tags = {**{k: f"{metrics[k]:.6g}" for k in spec.headline if k in metrics}, **(tags or {})}
    logged = client.create_logged_model(run.experiment_id, name=spec.name, source_run_id=run.run_id,
                                        tags={k: str(v) for k, v in version_tags.items()})  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="scratchgpt-model-") as tmp, _quiet_artifact_progress():
            _save(spec, model_dir, Path(tmp), run.run_id, logged)
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be what failed: report the first error, not this
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return _register(client, spec, logged.model_id, run.run_id, version_tags, metrics), logged.model_id


@contextlib.contextmanager
def _quiet_artifact_progress() -> Iterator[None]:
    """No "Downloading artifacts" bar in the stage's log while MLflow copies the model directory (unless
    the user set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR)."""
    if PROGRESS_ENV in os.environ:
        yield
        return
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_ENV, None)


def _save(spec: ModelSpec, model_dir: Path, tmp: Path, run_id: str, logged: Any) -> None:
    """The MLflow model in `tmp/model`; its code is a two-line script naming our wrapper ("models from
    code": nothing is pickled)."""
    from mlflow.models import Model

    code = tmp / f"{spec.name.replace('-', '_')}_model.py"
    code.write_text(f"import mlflow.models\nfrom scratchgpt.apps.serving import {spec.wrapper.__name__}\n\n"
                    f"mlflow.models.set_model({spec.wrapper.__name__}())\n")  # fmt: skip
    mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                         model_id=logged.model_id)  # fmt: skip
    mlflow.pyfunc.save_model(
        tmp / "model",
        python_model=code,
        artifacts={ARTIFACT: str(model_dir)},
        code_paths=[str(Path(scratchgpt.__file__).parent)],
        pip_requirements=pip_requirements(),
        signature=spec.signature,
        input_example=spec.input_example,
        model_config=spec.config,
        mlflow_model=mlflow_model,
    )


def _register(client: Any, spec: ModelSpec, model_id: str, run_id: str, tags: Mapping[str, str],
              metrics: Mapping[str, float]) -> Any:  # fmt: skip
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(spec.name, description=spec.summary)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    headline = ", ".join(f"{k} {metrics[k]:.4g}" for k in spec.headline if k in metrics)
    return client.create_model_version(
        spec.name, source=f"models:/{model_id}", run_id=run_id, tags=dict(tags), model_id=model_id,
        description=f"From MLflow run {run_id}: {headline}.",
    )  # fmt: skip
