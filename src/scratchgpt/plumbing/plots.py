"""Training curves: CSV tables for `dvc plots` and book-style matplotlib PNGs.

Rows are plain dicts, one per evaluation, e.g.
`{"step": 10, "epoch": 0.5, "tokens_seen": 5120, "train_loss": 7.1, "val_loss": 7.4}`.
The x value for epochs is fractional (progress through training, as the book's
`torch.linspace(0, num_epochs, len(losses))`), so the curve is smooth, not a staircase.

matplotlib is imported lazily and used without pyplot (a bare `Figure` renders with Agg), so this
module neither touches global plotting state nor needs a display.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scratchgpt.plumbing.fileio import atomic_path

#: Legend labels for the usual series; other keys are labelled with the key itself.
LABELS = {
    "train_loss": "Training loss",
    "val_loss": "Validation loss",
    "train_acc": "Training accuracy",
    "val_acc": "Validation accuracy",
    "train_accuracy": "Training accuracy",
    "val_accuracy": "Validation accuracy",
}
_LINESTYLES = ("-", "-.", "--", ":")


def write_plot_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], columns: Sequence[str]) -> None:
    """Atomically write `rows` as CSV with exactly `columns` (in that order) for `dvc plots`.

    Every row must have every column (extra keys are ignored); a None value is an empty cell.
    Floats are written with full round-trip precision.
    """
    if not columns:
        raise ValueError(f"{path}: no columns given")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{path}: duplicate columns in {list(columns)}")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(f"{path}: row {i} lacks column(s) {missing}; it has {sorted(row)}")
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else _cell(row[c]) for c in columns])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _cell(value.item())
    return str(value)


def plot_losses(
    rows: Sequence[Mapping[str, Any]],
    path_png: str | os.PathLike[str],
    *,
    x_epochs_key: str = "epoch",
    x_tokens_key: str = "tokens_seen",
    series: Sequence[str] = ("train_loss", "val_loss"),
    title: str | None = None,
) -> Path:
    """The book's loss plot: loss vs epochs, with tokens seen on a twin top x-axis. Returns the path."""
    return plot_metric(
        rows,
        path_png,
        x_key=x_epochs_key,
        series=series,
        ylabel="Loss",
        xlabel="Epochs",
        twin_x_key=x_tokens_key,
        twin_xlabel="Tokens seen",
        title=title,
        legend_loc="upper right",
    )


def plot_metric(
    rows: Sequence[Mapping[str, Any]],
    path_png: str | os.PathLike[str],
    *,
    x_key: str,
    series: Sequence[str],
    ylabel: str,
    xlabel: str | None = None,
    twin_x_key: str | None = None,
    twin_xlabel: str | None = None,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
    integer_x_ticks: bool = True,
    legend_loc: str | None = "best",
    dpi: int = 150,
    figsize: tuple[float, float] = (5, 3),
) -> Path:
    """Plot each of `series` against `x_key` (e.g. accuracy vs epochs, examples seen on top).

    Rows where a series' value is missing, None or NaN are skipped for that series only (e.g.
    validation measured less often than training). `twin_x_key` adds a top x-axis (tokens or
    examples seen) aligned with the bottom one, as in the book's figures. Writes the PNG
    atomically and returns its path. `legend_loc=None` draws no legend (e.g. for many series).
    """
    path = Path(path_png)
    if not rows:
        raise ValueError(f"{path}: no rows to plot")
    if not series:
        raise ValueError(f"{path}: no series to plot")
    labels = {**LABELS, **(labels or {})}
    xs = _column(rows, x_key, path)

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    plotted = False
    for i, key in enumerate(series):
        pts = [(x, _number(r.get(key), key, j, path)) for j, (x, r) in enumerate(zip(xs, rows, strict=True))]
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=labels.get(key, key))
        plotted = True
    if not plotted:
        raise ValueError(f"{path}: none of the series {list(series)} has a value in any row")
    ax.set_xlabel(xlabel or x_key)
    ax.set_ylabel(ylabel)
    if legend_loc is not None:
        ax.legend(loc=legend_loc)
    if integer_x_ticks:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if twin_x_key is not None:
        # An invisible line over the same rows against the twin x gives both axes the same data
        # limits and margins, so the two scales line up (the book's trick). It sits inside the
        # current y-limits, which are then pinned, so it cannot change the visible scaling.
        twin_x = _column(rows, twin_x_key, path)
        used = [t for t, r in zip(twin_x, rows, strict=True) if _has_any(r, series, path)]
        ylim = ax.get_ylim()
        top = ax.twiny()
        top.plot(used, [sum(ylim) / 2] * len(used), alpha=0)
        ax.set_ylim(ylim)
        top.set_xlabel(twin_xlabel or twin_x_key)
    return _save(fig, ax, path, title, dpi)


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float],
    path_png: str | os.PathLike[str],
    *,
    ylabel: str,
    groups: Sequence[str] | None = None,
    title: str | None = None,
    value_format: str = "{:.1%}",
    ranges: Sequence[tuple[float, float]] | None = None,
    dpi: int = 150,
) -> Path:
    """One bar per label, its value written on top; bars of the same `groups` entry share a colour (and
    the legend names the groups); `ranges` adds a (low, high) whisker to each bar. Writes the PNG
    atomically and returns its path."""
    path = Path(path_png)
    if not labels:
        raise ValueError(f"{path}: no bars to plot")
    if any(len(x) != len(labels) for x in (values, groups or labels, ranges or labels)):
        raise ValueError(f"{path}: labels, values, groups and ranges differ in length")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(16.0, 0.8 * len(labels) + 3.5), 3.6))  # room for the legend on the right
    ax = fig.subplots()
    colours = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(groups or ()))}
    yerr = None if ranges is None else [[v - lo for v, (lo, _) in zip(values, ranges, strict=True)],
                                        [hi - v for v, (_, hi) in zip(values, ranges, strict=True)]]  # fmt: skip
    bars = ax.bar(range(len(labels)), values, color=[colours[g] for g in groups] if groups else "C0", yerr=yerr,
                  capsize=4)  # fmt: skip
    ax.bar_label(bars, labels=[value_format.format(v) for v in values], fontsize=7)
    crowded = len(labels) > 4
    ax.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, max(values) * 1.12))
    if groups:
        from matplotlib.patches import Patch

        handles = [Patch(color=c, label=g) for g, c in colours.items()]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, ax, path, title, dpi)


def _save(fig: Any, ax: Any, path: Path, title: str | None, dpi: int) -> Path:
    """Title, lay out and atomically write a figure as PNG."""
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _column(rows: Sequence[Mapping[str, Any]], key: str, path: Path) -> list[float]:
    out = []
    for i, row in enumerate(rows):
        value = _number(row.get(key), key, i, path)
        if value is None:
            raise ValueError(f"{path}: row {i} has no value for x column {key!r}")
        out.append(value)
    return out


def _has_any(row: Mapping[str, Any], series: Sequence[str], path: Path) -> bool:
    return any(_number(row.get(k), k, -1, path) is not None for k in series)


def _number(value: Any, key: str, row: int, path: Path) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: row {row} column {key!r}: not a number: {value!r}") from None
    return None if math.isnan(number) else number


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path_png: str | os.PathLike[str], *,
    title: str | None = None, dpi: int = 150,
) -> Path:
    """scikit-learn's confusion-matrix figure (rows: true label, columns: predicted), written atomically; it
    grows with the number of classes, and long class names are slanted."""
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    path = Path(path_png)
    n = len(labels)
    fig = Figure(figsize=(3.6, 3.2) if n <= 2 else (1.8 + 0.7 * n, 1.5 + 0.7 * n))
    ax = fig.subplots()
    slant = 45 if n > 2 and max(len(str(label)) for label in labels) > 6 else "horizontal"
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(
        ax=ax, colorbar=False, cmap="Blues", xticks_rotation=slant
    )
    return _save(fig, ax, path, title, dpi)
