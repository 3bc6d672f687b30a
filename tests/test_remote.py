"""A DVC remote for real: the tiny pipeline reproduced and committed, `dvc push` to a local-directory remote,
then a fresh `git clone` + `dvc pull` that finds every stage up to date and reruns nothing."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from scratchgpt.orchestration import read_stages
from scratchgpt.plumbing.fileio import sha256_file

pytestmark = pytest.mark.slow

# One file of each kind of cached output: data, a persistent checkpoint, a model, a stage's file output.
PULLED = ("data/raw/vocab.bpe", "data/raw-manifest.json", "data/processed/cls/train.parquet",
          "models/pretrain/trainer_state.pt", "models/spam-classifier/model.safetensors",
          "data/responses/instruct_test.json")  # fmt: skip


def test_push_then_pull_in_a_fresh_clone_is_up_to_date(tiny_pipeline, tmp_path) -> None:
    project = tiny_pipeline
    remote = tmp_path / "remote"
    project.run("dvc", "remote", "add", "-d", "storage", str(remote))
    project.run("git", "commit", "-q", "-m", "DVC remote", ".dvc/config")
    assert "pushed" in project.run("dvc", "push")
    assert any(remote.rglob("*")) and "are in sync" in project.run("dvc", "status", "--cloud")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.path), str(clone)], check=True, timeout=60)
    run = type(project)(clone, project.env).run
    assert not any((clone / rel).exists() for rel in PULLED)  # git holds no data or models
    run("dvc", "pull")
    for rel in PULLED:
        assert sha256_file(clone / rel) == sha256_file(project.path / rel), rel
    assert "Data and pipelines are up to date." in run("dvc", "status")
    out = run("dvc", "repro")
    for stage in read_stages(clone):
        assert f"Stage '{stage.name}' didn't change, skipping" in out
    assert "Running stage" not in out
    assert yaml.safe_load((clone / "dvc.lock").read_text()) == yaml.safe_load((project.path / "dvc.lock").read_text())
    assert run("git", "status", "--porcelain") == ""  # nothing rewritten
