"""What the Prefect flow relies on, without Prefect: stage order from dvc.yaml, overrides checked and
written as DVC writes them, params.yaml put back, the checkout lock, DVC's verdicts, the summary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scratchgpt import orchestration as orch
from scratchgpt.plumbing.params import ParamsError, flatten, read_params

REPO = Path(__file__).resolve().parents[1]


# --- stages -----------------------------------------------------------------------------------------


def test_the_projects_stages_come_in_pipeline_order():
    stages = orch.read_stages(REPO)
    names = [s.name for s in stages]
    known = ["download", "tokenize", "sample-to-parquet", "pretrain", "load-gpt2", "lora-cls-finetune"]
    assert [n for n in names if n in known] == known
    for i, stage in enumerate(stages):  # everything a stage depends on comes before it
        assert {u.name for u in orch.upstream_of(stage, stages)} <= set(names[:i])
    pretrain = next(s for s in stages if s.name == "pretrain")
    assert "metrics/pretrain.json" in pretrain.metrics and "models/pretrain" in pretrain.outs


def test_order_follows_dependencies_not_the_file_and_cycles_are_refused(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          c:
            cmd: cat b/x > c.txt
            deps: [b/x]
            outs: [c.txt]
          a:
            cmd: echo a > a.txt
            outs: [a.txt]
          b:
            cmd: mkdir -p b && cp a.txt b/x
            deps: [a.txt]
            outs: [b]
          lone:
            cmd: echo lone
            metrics: [{m.json: {cache: false}}]
        """))  # fmt: skip
    stages = orch.read_stages(tmp_path)
    assert [s.name for s in stages] == ["a", "b", "c", "lone"]  # c needs b/x, inside b's output directory
    assert [s.name for s in orch.select_stages(stages, ["c"])] == ["a", "b", "c"]
    assert [s.name for s in orch.select_stages(stages, ["lone", "a"])] == ["a", "lone"]
    assert [s.name for s in orch.select_stages(stages, None)] == ["a", "b", "c", "lone"]
    with pytest.raises(orch.PipelineError, match=r"unknown stage\(s\) \['d'\]"):
        orch.select_stages(stages, ["d"])

    (tmp_path / "dvc.yaml").write_text("stages:\n  x: {cmd: a, deps: [y.txt], outs: [x.txt]}\n"
                                       "  y: {cmd: b, deps: [x.txt], outs: [y.txt]}\n")  # fmt: skip
    with pytest.raises(orch.PipelineError, match="cycle"):
        orch.read_stages(tmp_path)


def test_the_graph_drawn_is_the_pipelines_dag_without_the_edges_other_paths_imply(tmp_path: Path):
    stages = orch.read_stages(REPO)
    assert orch.upstream_graph(stages) == {
        "download": [], "tokenize": ["download"], "sample-to-parquet": ["tokenize"],
        "pretrain": ["sample-to-parquet"], "load-gpt2": ["pretrain"], "lora-cls-finetune": ["load-gpt2"],
        "instruct-finetune": ["load-gpt2"], "evaluate": ["lora-cls-finetune", "instruct-finetune"],
    }  # fmt: skip
    # dvc.yaml's own edges include the implied ones (download's vocabulary files, pretrain's metrics)
    evaluate = next(s for s in stages if s.name == "evaluate")
    assert {u.name for u in orch.upstream_of(evaluate, stages)} > {"pretrain", "lora-cls-finetune"}
    assert orch.upstream_graph(orch.select_stages(stages, ["load-gpt2"]))["load-gpt2"] == ["pretrain"]

    # a diamond with a shortcut: d needs b and c (both need a) and a directly; the shortcut a -> d is implied
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          a: {cmd: x, outs: [a.txt]}
          b: {cmd: x, deps: [a.txt], outs: [b.txt]}
          c: {cmd: x, deps: [a.txt], outs: [c.txt]}
          d: {cmd: x, deps: [a.txt, b.txt, c.txt], outs: [d.txt]}
          lone: {cmd: x, outs: [l.txt]}
        """))  # fmt: skip
    graph = orch.upstream_graph(orch.read_stages(tmp_path))
    assert graph == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "lone": []}


# --- overrides --------------------------------------------------------------------------------------


def test_assignments_are_read_as_yaml_values():
    assert orch.parse_assignments(["pretrain.train.lr=3e-4", "cls.mode=lora", "pretrain.train.betas=[0.9, 0.99]",
                                   "load_gpt2.sha256=null", "pretrain.train.compile=true"]) == {
        "pretrain.train.lr": 3e-4, "cls.mode": "lora", "pretrain.train.betas": [0.9, 0.99],
        "load_gpt2.sha256": None, "pretrain.train.compile": True,
    }  # fmt: skip
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        orch.parse_assignments(["pretrain.train.lr"])


def test_overrides_are_checked_and_no_ops_dropped():
    params = read_params(REPO / "params.yaml")
    lr = params["pretrain"]["train"]["lr"]
    assert orch.resolve_overrides(params, {"pretrain.train.lr": lr, "cls.train.epochs": 2}) == {"cls.train.epochs": 2}
    with pytest.raises(ParamsError, match=r"pretrain\.train\.learning_rate: no such key.*pretrain\.train has .*, lr,"):
        orch.resolve_overrides(params, {"pretrain.train.learning_rate": 1e-3})
    with pytest.raises(ParamsError, match=r"did you mean pretrain\.train\.epochs\?"):
        orch.resolve_overrides(params, {"pretrain.train.epoch": 3})
    with pytest.raises(ParamsError, match=r"did you mean pretrain\.train\.lr or"):
        orch.resolve_overrides(params, {"pretrain.trian.lr": 3})
    with pytest.raises(ParamsError, match=r"pretrain\.train: a section"):
        orch.resolve_overrides(params, {"pretrain.train": 1})
    with pytest.raises(ParamsError, match="lr must be"):
        orch.resolve_overrides(params, {"pretrain.train.lr": -1})
    with pytest.raises(ParamsError, match="device must be one of"):
        orch.resolve_overrides(params, orch.hardware_overrides(params, device="tpu"))
    with pytest.raises(ParamsError, match="nproc must be a positive integer"):
        orch.resolve_overrides(params, {"cls.train.nproc": 0})
    with pytest.raises(ParamsError, match="context_length"):  # the cross-check between sections
        orch.resolve_overrides(params, {"sample.max_length": 4096})


def test_hardware_overrides_set_every_key_of_that_name():
    params = read_params(REPO / "params.yaml")
    hw = orch.hardware_overrides(params, device="cuda", precision="bf16-mixed", nproc=4)
    flat = flatten(params)
    assert {k for k in hw if k.endswith(".device")} == {k for k in flat if k.endswith(".device")}
    assert {"pretrain.train.device", "load_gpt2.device", "cls.train.device"} <= set(hw)
    assert hw["pretrain.train.precision"] == "bf16-mixed" and hw["cls.train.nproc"] == 4
    assert orch.hardware_overrides(params) == {}
    orch.resolve_overrides(params, hw)  # valid values


def test_overrides_are_written_like_dvc_exp_run_and_put_back(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    original = (tmp_path / "params.yaml").read_text()
    changes = {"pretrain.train.lr": 1e-5, "pretrain.train.betas": [0.9, 0.99], "cls.mode": "lora",
               "load_gpt2.start_context": "Hello: world", "pretrain.train.eval_iter": None}  # fmt: skip
    with orch.overrides_applied(tmp_path, changes):
        text = (tmp_path / "params.yaml").read_text()
        assert "# peak learning rate" in text  # comments and layout survive, as with `dvc exp run -S`
        written = flatten(read_params(tmp_path / "params.yaml"))
        assert {k: written[k] for k in changes} == changes
        assert (tmp_path / orch.PARAMS_BACKUP).read_text() == original
    assert (tmp_path / "params.yaml").read_text() == original and not (tmp_path / orch.PARAMS_BACKUP).exists()

    # a run killed with its overrides applied: the next run puts params.yaml back first
    with pytest.raises(KeyboardInterrupt), orch.overrides_applied(tmp_path, {"cls.mode": "full"}):
        raise KeyboardInterrupt  # Ctrl-C: put back on the way out ...
    assert (tmp_path / "params.yaml").read_text() == original
    (tmp_path / orch.PARAMS_BACKUP).write_text(original)  # ... SIGKILL: what it leaves behind
    (tmp_path / "params.yaml").write_text(original.replace("mode: full", "mode: lora"))
    assert orch.restore_params(tmp_path) and (tmp_path / "params.yaml").read_text() == original
    assert not orch.restore_params(tmp_path)


def test_dvc_set_args_round_trip_through_dvc_exp_run_syntax():
    args = orch.dvc_set_args({"pretrain.train.eps": 1e-8, "cls.mode": "last-block", "x.y": None, "z": [1, 2]})
    assert args == ["pretrain.train.eps=1.0e-08", "cls.mode=last-block", "x.y=null", "z=[1,2]"]


# --- the checkout lock ------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""\
    import sys, time
    from scratchgpt import orchestration as orch
    with orch.checkout_lock(sys.argv[1], {"flow_run": "first-run", "pid": 1234}, timeout=5):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """)


def _start_holder(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_waits_for_the_lock_then_fails_naming_the_holder(tmp_path: Path):
    proc = _start_holder(tmp_path, 60)
    try:
        waited = []
        start = time.monotonic()
        busy = r"another pipeline run is using .*flow_run first-run.*waited 1 s"
        with pytest.raises(orch.CheckoutBusy, match=busy), orch.checkout_lock(
            tmp_path, {"flow_run": "second"}, timeout=1, on_wait=waited.append, poll=0.05
        ):
            pytest.fail("got the lock while another process holds it")
        assert 1 <= time.monotonic() - start < 5
        assert waited and waited[0]["flow_run"] == "first-run" and "since" in waited[0]
    finally:
        proc.kill()  # SIGKILL: the kernel drops the lock, no stale lock file can block the next run
        proc.wait(timeout=10)
    with orch.checkout_lock(tmp_path, {"flow_run": "third"}, timeout=0) as path:
        assert json.loads(path.read_text())["flow_run"] == "third"
    assert path.read_text() == ""


def test_a_waiting_run_gets_the_lock_when_the_holder_ends(tmp_path: Path):
    proc = _start_holder(tmp_path, 1.0)
    try:
        start = time.monotonic()
        with orch.checkout_lock(tmp_path, {"flow_run": "second"}, timeout=30, poll=0.05):
            assert proc.poll() is not None or time.monotonic() - start > 0.5
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- DVC's verdicts, metrics, summary ---------------------------------------------------------------


def test_stage_outcome_reads_dvcs_messages():
    assert orch.stage_outcome("pretrain", "Running stage 'pretrain':\n> python stages/pretrain.py") == orch.RAN
    assert orch.stage_outcome("pretrain", "Stage 'pretrain' didn't change, skipping") == orch.SKIPPED
    assert orch.stage_outcome("tokenize", "Stage 'tokenize' is cached - skipping run, checking out outputs") == (
        orch.RESTORED
    )
    assert orch.stage_outcome("download", "Pulling data for stage: 'download'") == orch.PULLED


def test_headline_metrics_and_summary(tmp_path: Path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "cls.json").write_text(json.dumps(
        {"examples_per_s": 300.0, "test_accuracy": 0.92, "val_loss": 0.31, "test_f1": 0.9, "steps": 650}))
    (tmp_path / "metrics" / "sample.json").write_text(json.dumps({"pretrain": {"train_windows": 73}}))
    cls = orch.Stage("cls", "", (), ("metrics/cls.json",), ("metrics/cls.json", "metrics/missing.json"))
    sample = orch.Stage("sample", "", (), (), ("metrics/sample.json",))
    assert orch.headline_metrics(tmp_path, cls) == {"test_accuracy": 0.92, "test_f1": 0.9, "val_loss": 0.31}
    assert orch.headline_metrics(tmp_path, sample) == {"pretrain.train_windows": 73}
    md = orch.summary_markdown(
        [{"stage": "cls", "state": "ran", "wall_time_s": 12.34, "metrics": {"test_accuracy": 0.92},
          "mlflow_run_id": "abc"}, {"stage": "evaluate", "state": "not run"}],
        {"status": "FAILED", "error": "stage 'x' failed", "DVC experiment": None},
    )  # fmt: skip
    assert md.startswith("# Pipeline run: FAILED")
    assert "- **error**: stage 'x' failed" in md and "DVC experiment" not in md
    assert "| cls | ran | 12.3 s | test_accuracy 0.92 | abc |" in md and "| evaluate | not run |  |  |  |" in md
    # a tracking server: the run id links to the run's page
    page = "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    linked = orch.summary_markdown([{"stage": "cls", "state": "ran", "mlflow_run_id": "abc", "mlflow_run_url": page}],
                                   {})  # fmt: skip
    assert f"| [abc]({page}) |" in linked
