"""scratchgpt.plumbing.plots: DVC plot CSVs and book-style PNGs, written atomically."""

from __future__ import annotations

import csv
import math
import struct

import pytest

from scratchgpt.plumbing.plots import plot_bars, plot_losses, plot_metric, write_plot_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loss_rows(n: int = 20, epochs: int = 10) -> list[dict]:
    """Curves shaped like the book's chapter 5 run (train falls to ~0.6, val flattens at ~6.4)."""
    rows = []
    for i in range(n):
        e = epochs * i / (n - 1)
        rows.append(
            {
                "step": i * 5,
                "epoch": e,
                "tokens_seen": i * 5 * 512,
                "train_loss": 9.2 * math.exp(-0.35 * e) + 0.6,
                "val_loss": 6.4 + 3.5 * math.exp(-0.9 * e),
                "lr": 4e-4,
            }
        )
    return rows


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def no_temp_files(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_write_plot_csv_columns_rows_and_precision(tmp_path):
    rows = loss_rows(4)
    rows[1]["val_loss"] = None
    path = tmp_path / "plots" / "pretrain_loss.csv"
    cols = ["step", "tokens_seen", "train_loss", "val_loss"]
    write_plot_csv(rows, path, cols)
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == cols
    assert len(got) == 4
    assert [int(r["step"]) for r in got] == [0, 5, 10, 15]
    assert float(got[2]["train_loss"]) == rows[2]["train_loss"]  # round-trips exactly
    assert got[1]["val_loss"] == ""
    assert "lr" not in got[0]
    assert no_temp_files(path.parent)


def test_write_plot_csv_bad_rows_leave_old_file_intact(tmp_path):
    path = tmp_path / "p.csv"
    write_plot_csv([{"a": 1}], path, ["a"])
    with pytest.raises(KeyError, match=r"row 1 lacks column\(s\) \['b'\]"):
        write_plot_csv([{"a": 1, "b": 2}, {"a": 3}], path, ["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        write_plot_csv([{"a": 1}], path, ["a", "a"])
    assert path.read_text() == "a\n1\n"
    assert no_temp_files(tmp_path)


def test_empty_rows_give_a_header_only_csv(tmp_path):
    write_plot_csv([], tmp_path / "e.csv", ["step", "train_loss"])
    assert (tmp_path / "e.csv").read_text() == "step,train_loss\n"


def test_plot_losses_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "pretrain_loss.png"
    rows = loss_rows()
    rows[3]["val_loss"] = float("nan")  # skipped, not drawn as a gap-crossing spike
    assert plot_losses(rows, path, title="pretrain") == path
    width, height = png_size(path)
    assert (width, height) == (750, 450)  # 5x3 inches at 150 dpi, as the book's figure
    assert path.stat().st_size > 10_000
    assert no_temp_files(path.parent)


def test_plot_metric_accuracy_with_examples_seen(tmp_path):
    rows = [
        {"epoch": e, "examples_seen": e * 1000, "train_acc": 0.5 + 0.045 * e, "val_acc": 0.5 + 0.04 * e}
        for e in range(11)
    ]
    path = tmp_path / "acc.png"
    plot_metric(
        rows,
        path,
        x_key="epoch",
        series=("train_acc", "val_acc"),
        ylabel="Accuracy",
        xlabel="Epochs",
        twin_x_key="examples_seen",
        twin_xlabel="Examples seen",
    )
    assert png_size(path) == (750, 450)


def test_plot_rejects_bad_input_and_keeps_old_png(tmp_path):
    path = tmp_path / "loss.png"
    plot_losses(loss_rows(), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="no rows"):
        plot_losses([], path)
    with pytest.raises(ValueError, match=r"row 0 has no value for x column 'epoch'"):
        plot_losses([{"train_loss": 1.0, "tokens_seen": 0}], path)
    with pytest.raises(ValueError, match=r"row 1 column 'train_loss': not a number: 'oops'"):
        plot_losses(
            [{"epoch": 0, "tokens_seen": 0, "train_loss": 1}, {"epoch": 1, "tokens_seen": 9, "train_loss": "oops"}],
            path,
        )
    with pytest.raises(ValueError, match="none of the series"):
        plot_losses([{"epoch": 0, "tokens_seen": 0}], path)
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_plot_bars_by_group_with_ranges_and_bad_input(tmp_path):
    path = tmp_path / "acc.png"
    plot_bars(["a", "b", "c"], [0.9, 0.8, 0.95], path, ylabel="Accuracy", groups=["lora", "full", "lora"],
              ranges=[(0.85, 0.92), (0.8, 0.8), (0.9, 0.97)], title="by mode")  # fmt: skip
    assert png_size(path) == (885, 540)  # (0.8 * 3 + 3.5) x 3.6 inches at 150 dpi
    before = path.read_bytes()
    with pytest.raises(ValueError, match="no bars"):
        plot_bars([], [], path, ylabel="Accuracy")
    with pytest.raises(ValueError, match="differ in length"):
        plot_bars(["a", "b"], [0.5], path, ylabel="Accuracy")
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)
