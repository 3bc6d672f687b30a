"""scratchgpt.compare: runs selected from a real MLflow store; the three classifier modes as real DVC experiments.

The unit tests build their store with the tracking API the stages use (`pipeline_run`, nested `stage_run`s,
`DVC_EXP_NAME` in the environment as `dvc exp run` sets it); the slow test runs the tiny pipeline with DVC.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO

from scratchgpt import compare, orchestration
from scratchgpt.compare import CompareError
from scratchgpt.plumbing import tracking

EXPERIMENT = "compare-unit"
CLS = "lora-cls-finetune"
MODES = ("lora", "last-block", "full")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def comparison_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.{tracking.COMPARISON_TAG} = 'true'")


# --- unit tests on a store built with the tracking API ------------------------------------------------------


@dataclass
class Store:
    uri: str
    parents: list[str]  # two pipeline runs: pretrain lr 0.001 and 0.003


def _stage(name: str, params: dict, final: dict[str, float], history: list[float] = ()) -> str:
    with tracking.stage_run(name, params, experiment=None) as run:
        for i, value in enumerate(history):
            run.log_metrics({"val_loss": value, "train_loss": value + 1}, step=1 + 5 * i)
        run.log_metrics(final, step=len(history) * 5)
        return run.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """In experiment EXPERIMENT: two pipeline runs (each: pretrain + classifier nested under a parent; the
    second parent also holds a FAILED classifier run), a DVC experiment's classifier run logged twice, a
    lone load-gpt2 run and a FAILED lone run."""
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_RUN_ID", tracking.ENV_PARENT_RUN_ID):
        mp.delenv(name, raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv(tracking.ENV_EXPERIMENT, EXPERIMENT)
    parents = []
    try:
        for i, lr in enumerate((0.001, 0.003)):
            with tracking.pipeline_run("pipeline", {"override": {"pretrain.train.lr": lr}}) as parent:
                mp.setenv(tracking.ENV_PARENT_RUN_ID, parent.run_id)
                _stage("pretrain", {"pretrain": {"train": {"lr": lr, "epochs": 2}}},
                       {"final_val_loss": 6.0 - i, "final_val_perplexity": 400.0 - i, "final_tokens_per_s": 1000.0},
                       [9.0 - i, 7.0 - i, 6.0 - i])  # fmt: skip
                if i == 1:
                    with pytest.raises(RuntimeError), tracking.stage_run(CLS, {"cls": {"mode": "lora"}}) as run:
                        run.log_metrics({"final_test_accuracy": 0.1})
                        raise RuntimeError("killed")
                _stage(CLS, {"cls": {"mode": "lora"}}, {"final_test_accuracy": 0.8 + i / 10, "final_test_f1": 0.7},
                       [0.7, 0.5])  # fmt: skip
                mp.delenv(tracking.ENV_PARENT_RUN_ID)
            parents.append(parent.run_id)
        mp.setenv("DVC_EXP_NAME", "exp-full")
        _stage(CLS, {"cls": {"mode": "full"}}, {"final_test_accuracy": 0.5, "final_test_f1": 0.5})
        _stage(CLS, {"cls": {"mode": "full"}}, {"final_test_accuracy": 0.93, "final_test_f1": 0.92}, [0.6, 0.3])
        mp.delenv("DVC_EXP_NAME")
        _stage("load-gpt2", {"load_gpt2": {"base": "pretrain"}}, {"val_loss": 6.2})
        with pytest.raises(RuntimeError), tracking.stage_run("pretrain", {"pretrain": {"train": {"lr": 0.1}}}):
            raise RuntimeError("failed")
    finally:
        mp.undo()  # the tests name the store and experiment themselves
    return Store(uri, parents)


def test_parent_runs_are_compared_with_their_nested_stage_runs(store: Store, tmp_path: Path):
    out = tmp_path / "cmp"
    result = compare.compare(parents=store.parents[::-1], out=out, tracking_uri=store.uri, log_run=False)

    assert [e.kind for e in result.entries] == ["pipeline", "pipeline"]
    assert [e.parent.info.run_id for e in result.entries] == store.parents[::-1]  # in the order asked for
    assert result.differing == ["pipeline.override.pretrain.train.lr", "pretrain.train.lr"]
    rows = read_csv(out / compare.CSV_FILE)
    assert [r["pretrain.train.lr"] for r in rows] == ["0.003", "0.001"]
    assert [float(r["pretrain.val_loss"]) for r in rows] == [5.0, 6.0]
    assert [float(r["cls.test_accuracy"]) for r in rows] == [0.9, 0.8]  # the FINISHED run, not the failed one
    assert "cls.mode" not in result.differing and [r["cls.mode"] for r in rows] == ["lora", "lora"]
    assert all(len(r["run_ids"].split()) == 3 for r in rows)  # the parent and its two stage runs
    labels = [e.label for e in result.entries]
    assert result.curves["pretrain"][labels[0]] == [(1, 8.0), (6, 6.0), (11, 5.0)]
    assert result.curves[CLS][labels[1]] == [(1, 0.7), (6, 0.5)]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([compare.MARKDOWN_FILE, compare.CSV_FILE, compare.ACCURACY_PNG,
                            "val_loss_pretrain.png", f"val_loss_{CLS}.png"])  # fmt: skip
    assert (out / "val_loss_pretrain.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / compare.MARKDOWN_FILE).read_text()
    assert "| pretrain.train.lr |" in md.replace("| pipeline.override.pretrain.train.lr ", "")
    assert "![cls_accuracy.png](cls_accuracy.png)" in md


def test_whole_experiment_groups_runs_and_logs_a_comparison_run_that_is_never_compared(store: Store, tmp_path):
    first = compare.compare(experiment=EXPERIMENT, out=tmp_path / "a", tracking_uri=store.uri)
    kinds = sorted((e.kind, e.label) for e in first.entries)
    assert [k for k, _ in kinds] == ["dvc-exp", "pipeline", "pipeline", "run"]  # failed lone run left out
    assert ("dvc-exp", "exp-full") in kinds
    lone = next(e for e in first.entries if e.kind == "run")
    assert list(lone.stages) == ["load-gpt2"] and lone.label.startswith("load-gpt2 ")
    exp_row = next(r for r in first.rows if r["entry"] == "exp-full")
    assert exp_row["cls.test_accuracy"] == 0.93  # the later of its two runs
    assert "cls.mode" in first.differing

    logged = comparison_runs(store.uri, EXPERIMENT)
    assert [r.info.run_id for r in logged] == [first.run_id]
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=store.uri).list_artifacts(first.run_id)}
    assert {compare.MARKDOWN_FILE, compare.CSV_FILE, compare.ACCURACY_PNG, "val_loss_pretrain.png"} <= artifacts

    second = compare.compare(experiment=EXPERIMENT, out=tmp_path / "a", tracking_uri=store.uri, log_run=False)
    assert len(second.entries) == len(first.entries)  # the comparison run is not an entry
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f.name for f in second.files)


def test_dvc_experiment_by_name(store: Store, tmp_path: Path):
    result = compare.compare(dvc_exps=["exp-full"], experiment=EXPERIMENT, out=tmp_path / "c", tracking_uri=store.uri,
                             log_run=False)
    (entry,) = result.entries
    assert (entry.kind, entry.label, list(entry.stages)) == ("dvc-exp", "exp-full", [CLS])
    assert result.rows[0]["cls.test_accuracy"] == 0.93 and result.rows[0]["cls.mode"] == "full"
    assert list(result.curves) == [CLS]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({"dvc_exps": ["exp-full", "nope"]}, "dvc_exp_name=nope .*DVC experiments with runs there: exp-full"),
        ({"parents": ["0" * 32]}, "no MLflow run 0{32}"),
        ({"parents": ["x' OR '1"]}, "not MLflow run ids"),
        ({"experiment": "missing"}, "no MLflow experiment 'missing'.*compare-unit"),
        ({"parents": ["a"], "dvc_exps": ["b"]}, "not both"),
    ],
)
def test_nothing_matching_is_a_clear_error_and_writes_nothing(store: Store, tmp_path, selection, message):
    with pytest.raises(CompareError, match=message):
        compare.compare(**{"experiment": EXPERIMENT, **selection}, out=tmp_path / "out", tracking_uri=store.uri)
    assert not (tmp_path / "out").exists()


def test_a_stage_run_is_not_a_parent_with_nested_runs(store: Store, tmp_path: Path):
    from mlflow import MlflowClient

    lone = MlflowClient(tracking_uri=store.uri).search_runs(
        [MlflowClient(tracking_uri=store.uri).get_experiment_by_name(EXPERIMENT).experiment_id],
        "tags.dvc_stage = 'load-gpt2'")[0].info.run_id  # fmt: skip
    with pytest.raises(CompareError, match=f"{lone}.* no finished stage runs nested"):
        compare.compare(parents=[lone], out=tmp_path / "out", tracking_uri=store.uri)


def test_empty_experiment_is_a_clear_error(store: Store, tmp_path: Path):
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=store.uri).create_experiment("empty")
    with pytest.raises(CompareError, match="'empty'.* holds no finished stage runs"):
        compare.compare(experiment="empty", out=tmp_path / "out", tracking_uri=store.uri)


def test_out_that_is_not_an_earlier_comparison_is_refused(store: Store, tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(CompareError, match="not an earlier comparison"):
        compare.compare(dvc_exps=["exp-full"], experiment=EXPERIMENT, out=tmp_path, tracking_uri=store.uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_command_line_prints_the_table_and_exits_1_on_no_match(store: Store, tmp_path, capsys):
    assert compare.main(["--tracking-uri", store.uri, "--experiment", EXPERIMENT, "--dvc-exp", "exp-full",
                         "--out", str(tmp_path / "o"), "--no-log"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "exp-full" in printed and "93.00%" in printed and "cls.test_accuracy" in printed
    assert compare.main(["--tracking-uri", store.uri, "--experiment", EXPERIMENT, "--dvc-exp", "nope",
                         "--out", str(tmp_path / "p")]) == 1  # fmt: skip
    assert "error: no finished stage runs tagged dvc_exp_name=nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        compare.main(["--help"])
    assert exit_.value.code == 0 and "--dvc-exp" in capsys.readouterr().out


def test_headline_stages_are_the_pipelines_stages():
    stages = {s.name for s in orchestration.read_stages(REPO)}
    assert {h.stage for h in compare.HEADLINES} | set(compare.CURVE_STAGES) <= stages


# --- the README's use, for real: three classifier modes as DVC experiments -------------------------------


def _exp_metrics(show: list[dict]) -> dict[str, dict]:
    """{experiment name: metrics/cls.json} from `dvc exp show --json`."""
    found = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                found[exp["name"]] = rev["data"]["metrics"]["metrics/cls.json"]["data"]
    return found


@pytest.fixture(scope="module")
def cls_experiments(cls_project):
    """The tiny pipeline up to lora-cls-finetune (conftest's `cls_project`), then `dvc exp run -n cls-MODE -S
    cls.mode=MODE lora-cls-finetune` for each mode."""
    project = cls_project
    for mode in MODES:
        project.run("dvc", "exp", "run", "-n", f"cls-{mode}", "-S", f"cls.mode={mode}", CLS)
    return project


@pytest.mark.slow
@pytest.mark.heavy
def test_three_cls_modes_run_as_dvc_experiments_are_compared_in_one_command(cls_experiments):
    project = cls_experiments
    names = [f"cls-{m}" for m in MODES]
    printed = project.run(sys.executable, "-m", "scratchgpt.compare", "--dvc-exp", *names, stdout_only=True)

    expected = _exp_metrics(json.loads(project.run("dvc", "exp", "show", "--json", stdout_only=True)))
    out = project.path / compare.DEFAULT_OUT
    rows = read_csv(out / compare.CSV_FILE)
    assert [r["entry"] for r in rows] == names
    assert [r["cls.mode"] for r in rows] == list(MODES)
    for row in rows:
        assert float(row["cls.test_accuracy"]) == pytest.approx(expected[row["entry"]]["test_accuracy"], abs=1e-12)
        assert float(row["cls.test_f1"]) == pytest.approx(expected[row["entry"]]["test_f1"], abs=1e-12)
        assert row["kind"] == "dvc-exp" and len(row["run_ids"].split()) == 1
    lines = printed.splitlines()
    assert lines[0].split() == ["entry", *names]  # fewer entries than columns: a column per entry
    assert next(line for line in lines if line.startswith("cls.mode")).split() == ["cls.mode", *MODES]
    md = (out / compare.MARKDOWN_FILE).read_text()
    assert all(f"| {n} | dvc-exp | {m} |" in md for n, m in zip(names, MODES, strict=True))
    for png in (compare.ACCURACY_PNG, f"val_loss_{CLS}.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    uri = project.env["MLFLOW_TRACKING_URI"]
    (run,) = [r for r in comparison_runs(uri, tracking.DEFAULT_EXPERIMENT) if "sweep" not in r.data.tags]
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)}
    assert artifacts == {compare.MARKDOWN_FILE, compare.CSV_FILE, compare.ACCURACY_PNG, f"val_loss_{CLS}.png",
                         "params.json"}  # params.json: every tracked run has its params as a file too
    assert run.data.params["compare.dvc_exps"] == ",".join(names)
    assert all(r in run.data.tags["compared_runs"] for row in rows for r in row["run_ids"].split())
    assert subprocess.run(["git", "check-ignore", "-q", str(REPO / compare.DEFAULT_OUT / "x.png")], cwd=REPO,
                          check=False).returncode == 0  # fmt: skip


@pytest.mark.slow
@pytest.mark.heavy
def test_the_modes_runs_are_named_apart_in_an_experiment_marked_as_model_training(cls_experiments):
    """What MLflow's runs list shows for the three DVC experiments: a name per run that says its mode and
    experiment, in an experiment its UI opens on the runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cls_experiments.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], f"tags.dvc_stage = '{CLS}' and tags.dvc_exp_name LIKE 'cls-%'")
    assert sorted(r.info.run_name for r in runs) == [
        f"{CLS} · full · preset cpu · exp cls-full",
        f"{CLS} · last-block · preset cpu · exp cls-last-block",
        f"{CLS} · lora r16 · preset cpu · exp cls-lora",
    ]


def test_a_classifier_of_your_own_labels_shows_macro_f1_and_each_class() -> None:
    """Per-class test F1 (`final_test_class.<class>.f1`, class names made MLflow-safe) become `cls.f1[<class>]`
    columns after the headlines, for entries that have them; others show nothing there."""
    from types import SimpleNamespace

    def run(metrics: dict[str, float]) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={"cls.mode": "full"}),
                               info=SimpleNamespace(run_id="r" * 32, start_time=1000, end_time=2000))  # fmt: skip

    own = {"final_test_accuracy": 0.9, "final_test_macro_f1": 0.88, "final_test_class.billing.f1": 0.8,
           "final_test_class.returns _ refunds.f1": 0.95, "final_test_class.billing.recall": 0.7}  # fmt: skip
    entries = [compare.Entry("own", "run", {CLS: run(own)}),
               compare.Entry("book", "run", {CLS: run({"final_test_accuracy": 0.92, "final_test_f1": 0.91})})]
    table = compare.build_table(entries)
    assert table.headlines == ["cls.mode", "cls.test_accuracy", "cls.test_f1", "cls.test_macro_f1", "cls.f1[billing]",
                               "cls.f1[returns _ refunds]", "wall_time_s"]  # fmt: skip
    assert table.rows[0]["cls.f1[billing]"] == 0.8 and table.rows[1]["cls.f1[billing]"] is None
    assert "| own | run | full | 90.00% | — | 0.88 | 0.8 | 0.95 | 1.0 |" in compare.to_markdown(table)
