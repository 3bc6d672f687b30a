"""Every stage's metrics file holds numbers only (nested sections of numbers are fine), so `dvc metrics show`
prints one readable table; names, hashes and sources live elsewhere (the download manifest
data/raw-manifest.json, models/base/config.json). Checked on the whole tiny pipeline, every stage's writer."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from scratchgpt.orchestration import read_stages
from scratchgpt.plumbing.params import flatten

pytestmark = pytest.mark.slow


def not_numbers(data: dict) -> dict[str, object]:
    """The (dotted) keys of `data` whose values are not numbers: strings, booleans, lists, null."""
    return {k: v for k, v in flatten(data).items() if isinstance(v, bool) or not isinstance(v, int | float)}


def test_not_numbers_finds_what_dvc_cannot_tabulate() -> None:
    assert not_numbers({"a": 1, "b": {"c": 2.5, "d": {}}}) == {}
    assert not_numbers({"a": "x", "b": {"c": True, "d": [1], "e": None}}) == {
        "a": "x", "b.c": True, "b.d": [1], "b.e": None
    }  # fmt: skip


def test_every_stage_writes_a_metrics_file_of_numbers_only(tiny_pipeline) -> None:
    root = tiny_pipeline.path
    stages = read_stages(root)
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == {s.name for s in stages}
    for stage in stages:
        assert stage.metrics, f"stage {stage.name} declares no metrics file"
        for rel in stage.metrics:
            data = json.loads((root / rel).read_text())
            assert data and not_numbers(data) == {}, f"{rel} holds non-numbers: {not_numbers(data)}"


def test_download_names_and_hashes_are_in_its_manifest(tiny_pipeline) -> None:
    root = tiny_pipeline.path
    files = json.loads((root / "data" / "raw-manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in (root / "data" / "raw").iterdir()}
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and f["source"] == "mirror" for f in files.values())
    metrics = json.loads((root / "metrics" / "download.json").read_text())
    assert metrics["n_files"] == len(files) and metrics["origin"]["mirror"] == len(files)
    assert json.loads((root / "models" / "base" / "config.json").read_text())["source"]["kind"] == "pretrain"


def test_dvc_metrics_show_prints_every_file_as_a_table(tiny_pipeline) -> None:
    shown = json.loads(tiny_pipeline.run("dvc", "metrics", "show", "--json", stdout_only=True))
    (workspace,) = shown.values()  # the workspace only: {"": {"data": {path: {"data": ...}}}}
    files = workspace["data"]
    for stage in read_stages(tiny_pipeline.path):
        for rel in stage.metrics:
            assert "error" not in files[rel] and files[rel]["data"], rel
    table = tiny_pipeline.run("dvc", "metrics", "show", stdout_only=True)
    header = table.splitlines()[0].split()
    assert header[0] == "Path" and {"n_files", "total_bytes", "val_loss", "test_accuracy"} <= set(header)
    assert all(f"metrics/{name}.json" in table for name in ("download", "load_gpt2", "eval"))
    assert not re.search(r"[0-9a-f]{64}", table)  # no hashes
