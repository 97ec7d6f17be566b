"""Results of an experiment: a frame per trial, the depth x condition pivot, its formats and the plot.

Pure pandas and matplotlib over :class:`~transferlab.service.store.Store`; no torch. The figure follows
Yosinski et al. 2014 ("How transferable are features in deep neural networks?", figure 2).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from transferlab.service.store import Store

if TYPE_CHECKING:
    from rich.table import Table

CONDITION_ORDER = ("baseA", "baseB", "AnB", "AnB+", "BnB", "BnB+", "random", "single")
SOURCE_CONDITIONS = ("baseA",)  # measured on task A, so never "best" on the target task nor plotted
FORMATS = ("table", "csv", "json", "markdown")
RESULT_COLUMNS = ("trial_id", "key", "role", "condition", "depth", "seed", "split_id", "value", "metric")
STATS = ("mean", "std", "n")


class ReportError(Exception):
    """A report cannot be made: an unknown format, nothing to plot, or an unwritable path."""


@dataclass(frozen=True)
class ResultsSummary:
    """Which trials a results frame holds and which it leaves out."""

    experiment_id: int
    name: str
    metric: str
    higher_is_better: bool
    completed: int
    left_out: Mapping[str, int] = field(default_factory=dict)  # status -> trials not completed
    missing_metric: int = 0  # completed trials without a test value of the metric
    source_metric: str | None = None  # baseA's metric when it differs (cross-task transfer)

    def line(self) -> str:
        """One line for a caption, e.g. ``12 trials with test accuracy; left out: 2 failed``."""
        text = f"{self.completed} trials with test {self.metric}"
        if self.source_metric:
            text += f" (baseA: test {self.source_metric} on the source task)"
        parts = [f"{n} {status}" for status, n in self.left_out.items() if n]
        if self.missing_metric:
            parts.append(f"{self.missing_metric} completed without it")
        return f"{text}; left out: {', '.join(parts)}" if parts else text


def results_frame(store: Store, experiment_id: int | str) -> pd.DataFrame:
    """One row per completed trial with its test value of its task's primary metric.

    ``experiment_id`` is an id or a name, as for :meth:`Store.find_experiment`.

    Columns: trial_id, key, role, condition, depth, seed, split_id, value, metric. ``metric`` is the
    experiment's primary metric, except for base net A of a cross-task study, which reports its
    source task's (e.g. accuracy beside the target task's miou). Trials that are not completed, or
    have no test value, are left out and counted in ``frame.attrs["summary"]`` (a
    :class:`ResultsSummary`). When a trial has test values at several epochs, the last counts.
    """
    info = store.find_experiment(experiment_id)
    trials = store.trial_table(info.id, status="completed")
    frame = trials.rename(columns={"id": "trial_id", "split": "split_id", "primary_metric": "metric"})
    frame = frame[[*RESULT_COLUMNS[:-2], "metric"]]
    frame["metric"] = frame["metric"].fillna(info.primary_metric).astype(str)
    names = sorted(set(frame["metric"])) or [info.primary_metric]
    metrics = pd.concat([store.metrics_frame(info.id, split="test", name=n) for n in names])
    last = metrics.sort_values(["trial_id", "epoch"]).groupby(["trial_id", "name"]).tail(1)
    last = last.rename(columns={"name": "metric"})[["trial_id", "metric", "value"]]
    frame = frame.merge(last, on=["trial_id", "metric"], how="left")[list(RESULT_COLUMNS)]
    missing = int(frame["value"].isna().sum())
    frame = frame.dropna(subset=["value"]).reset_index(drop=True)
    frame = frame.astype({"trial_id": "int64", "depth": "int64", "seed": "int64", "value": "float64"})
    frame.attrs["summary"] = ResultsSummary(
        experiment_id=info.id,
        name=info.name,
        metric=info.primary_metric,
        higher_is_better=info.higher_is_better,
        completed=len(frame),
        left_out={status: n for status, n in info.trial_counts.items() if status != "completed"},
        missing_metric=missing,
        source_metric=_source_metric(info, frame),
    )
    return frame


def _source_metric(info: Any, frame: pd.DataFrame) -> str | None:
    """Base net A's metric in a cross-task study (``transfer.source`` set), even when named alike."""
    if not (info.spec_json.get("transfer") or {}).get("source"):
        return None
    source = frame.loc[frame["condition"].isin(SOURCE_CONDITIONS), "metric"]
    return str(source.iloc[0]) if len(source) else None


def results_summary(store: Store, experiment_id: int | str) -> ResultsSummary:
    """The :class:`ResultsSummary` of :func:`results_frame`: what is tabulated and what is left out."""
    return results_frame(store, experiment_id).attrs["summary"]


def pivot_results(frame: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN for one value) and n of ``value`` by depth (rows) and condition.

    Columns are a (condition, stat) MultiIndex with conditions in the order baseA, baseB, AnB, AnB+,
    BnB, BnB+, random, single (then any others), and stats mean, std, n; ``n`` is 0 for an empty cell.
    ``higher_is_better`` decides which condition is best at each depth when formatting.
    """
    conditions = _ordered_conditions(frame["condition"].unique())
    columns = pd.MultiIndex.from_product([conditions, STATS], names=["condition", "stat"])
    if frame.empty:
        pivot = pd.DataFrame(index=pd.Index([], name="depth", dtype="int64"), columns=columns)
    else:
        grouped = frame.groupby(["depth", "condition"])["value"].agg(mean="mean", std="std", n="count")
        pivot = grouped.unstack("condition").swaplevel(axis=1).reindex(columns=columns).sort_index()
        pivot.index = pivot.index.astype("int64")
        for condition in conditions:
            pivot[(condition, "n")] = pivot[(condition, "n")].fillna(0).astype("int64")
    pivot.attrs.update(frame.attrs)
    pivot.attrs["higher_is_better"] = higher_is_better
    return pivot


def result_records(pivot: pd.DataFrame) -> list[dict[str, Any]]:
    """The non-empty cells of a pivot as records: depth, condition, mean, std (None if NaN), n."""
    records = []
    for depth, row in pivot.iterrows():
        for condition in pivot.columns.get_level_values("condition").unique():
            n = int(row[(condition, "n")])
            if n == 0:
                continue
            std = float(row[(condition, "std")])
            records.append(
                {
                    "depth": int(depth),
                    "condition": str(condition),
                    "mean": float(row[(condition, "mean")]),
                    "std": None if math.isnan(std) else std,
                    "n": n,
                }
            )
    return records


def results_table(pivot: pd.DataFrame, title: str, *, digits: int = 3) -> Table:
    """A rich table of the pivot: ``mean ± std`` cells, the best at each depth starred, n in the caption."""
    from rich.table import Table

    caption = _caption(pivot, best_marker="*")
    # A caption wraps at the table's width; keep the table at least as wide as its longest line.
    width = max(len(line) for line in caption.splitlines())
    table = Table(title=title, caption=caption, caption_justify="left", min_width=width)
    table.add_column("depth", justify="right")
    conditions = list(pivot.columns.get_level_values("condition").unique())
    for condition in conditions:
        table.add_column(condition, justify="center")
    cells = _cells(pivot, digits)
    best = _best_conditions(pivot)
    for depth in pivot.index:
        row = [str(depth)]
        for condition in conditions:
            text = cells.get((depth, condition), "")
            row.append(f"[bold]{text} *[/bold]" if condition in best.get(depth, ()) else text)
        table.add_row(*row)
    return table


def format_results(pivot: pd.DataFrame, fmt: str, *, title: str | None = None, digits: int = 3) -> str:
    """Render a pivot as ``table`` (rich, plain text), ``markdown``, ``csv`` or ``json``.

    Table and Markdown cells read ``0.912 ± 0.013`` with n in the caption line; CSV and JSON are
    records with separate depth, condition, mean, std and n fields at full precision.

    Raises:
        ReportError: an unknown format.
    """
    if fmt == "table":
        from rich.console import Console

        summary = pivot.attrs.get("summary")
        table = results_table(pivot, title or (summary.name if summary else "results"), digits=digits)
        console = Console(file=io.StringIO(), record=True, width=200, color_system=None)
        console.print(table)
        return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"
    if fmt == "markdown":
        return _markdown(pivot, title, digits)
    if fmt == "csv":
        frame = pd.DataFrame(result_records(pivot), columns=["depth", "condition", "mean", "std", "n"])
        return frame.to_csv(index=False, lineterminator="\n")
    if fmt == "json":
        return json.dumps(result_records(pivot), indent=2, allow_nan=False) + "\n"
    raise ReportError(f"unknown results format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _ordered_conditions(present: Any) -> list[str]:
    known = [c for c in CONDITION_ORDER if c in set(present)]
    return known + sorted(set(present) - set(CONDITION_ORDER))


def _common_n(pivot: pd.DataFrame) -> int | None:
    counts = [r["n"] for r in result_records(pivot)]
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else None


def _cells(pivot: pd.DataFrame, digits: int) -> dict[tuple[int, str], str]:
    """``mean ± std`` text of each non-empty cell; ``(n=k)`` where k differs from the usual n."""
    common = _common_n(pivot)
    cells = {}
    for r in result_records(pivot):
        text = (
            f"{r['mean']:.{digits}f}"
            if r["std"] is None
            else f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}"
        )
        if r["n"] != common:
            text += f" (n={r['n']})"
        cells[(r["depth"], r["condition"])] = text
    return cells


def _best_conditions(pivot: pd.DataFrame) -> dict[int, set[str]]:
    """The best target-task conditions (ties included) at each depth with at least two to compare."""
    sign = 1 if pivot.attrs.get("higher_is_better", True) else -1
    by_depth: dict[int, dict[str, float]] = {}
    for r in result_records(pivot):
        if r["condition"] not in SOURCE_CONDITIONS:
            by_depth.setdefault(r["depth"], {})[r["condition"]] = sign * r["mean"]
    return {
        depth: {c for c, score in scores.items() if score == max(scores.values())}
        for depth, scores in by_depth.items()
        if len(scores) > 1
    }


def _caption(pivot: pd.DataFrame, best_marker: str) -> str:
    common = _common_n(pivot)
    summary = pivot.attrs.get("summary")
    if common is None:
        text = "no completed trials with a test value yet"
    else:
        metric = f"test {summary.metric}" if summary else "values"
        direction = "higher" if pivot.attrs.get("higher_is_better", True) else "lower"
        text = f"mean ± std of {metric} over n={common} seeds/splits (unless marked)\n"
        text += f"{best_marker}: best at its depth ({direction} is better)"
    return f"{text}\n{summary.line()}" if summary else text


def _markdown(pivot: pd.DataFrame, title: str | None, digits: int) -> str:
    conditions = list(pivot.columns.get_level_values("condition").unique())
    cells = _cells(pivot, digits)
    best = _best_conditions(pivot)
    lines = [f"### {title}", ""] if title else []
    lines.append("| depth | " + " | ".join(conditions) + " |")
    lines.append("|---:|" + ":---:|" * len(conditions))
    for depth in pivot.index:
        row = []
        for condition in conditions:
            text = cells.get((depth, condition), "")
            row.append(f"**{text}**" if text and condition in best.get(depth, ()) else text)
        lines.append(f"| {depth} | " + " | ".join(row) + " |")
    lines += ["", "_" + _caption(pivot, best_marker="bold").replace("\n", "; ") + "_"]
    return "\n".join(lines) + "\n"


# -- the plot -------------------------------------------------------------------------------------

# Yosinski et al. 2014, figure 2: white baseB circles, dark blue BnB, light blue BnB+, red AnB, pink AnB+.
PLOT_STYLES: dict[str, dict[str, Any]] = {
    "baseB": {"marker": "o", "facecolor": "white", "edgecolor": "black", "color": "black"},
    "BnB": {"marker": "o", "facecolor": "#1f3f99", "edgecolor": "#1f3f99", "color": "#1f3f99"},
    "BnB+": {"marker": "P", "facecolor": "#7fb3e6", "edgecolor": "#3d7fbf", "color": "#7fb3e6"},
    "AnB": {"marker": "D", "facecolor": "#d62728", "edgecolor": "#a01c1c", "color": "#d62728"},
    "AnB+": {"marker": "^", "facecolor": "#f4a3c8", "edgecolor": "#d9649c", "color": "#f4a3c8"},
    "random": {"marker": "x", "facecolor": "#808080", "edgecolor": "#808080", "color": "#808080"},
    "single": {"marker": "v", "facecolor": "#1f3f99", "edgecolor": "#1f3f99", "color": "#1f3f99"},
}
_DEFAULT_STYLE = {"marker": "s", "facecolor": "#9467bd", "edgecolor": "#6b4a8a", "color": "#9467bd"}
_JITTER = 0.12  # half-width of the random x offset of each trial's marker, in depth units


def plot_transfer(frame: pd.DataFrame, path: str | os.PathLike[str], *, title: str, metric_name: str) -> Path:
    """Draw the accuracy-vs-depth figure of a transfer study (or per-seed points of a single study).

    x is the depth n, y the target task's test metric; each trial is a small jittered marker, the mean
    of each condition is joined by a line, and the baseB mean is a dashed line across the plot. baseA
    is measured on task A, so it is not drawn. The PNG is written atomically (temp file, rename).

    Args:
        frame: a :func:`results_frame`.
        path: the PNG to write; its folder must exist.
        title: the figure title.
        metric_name: the y-axis label, e.g. ``"accuracy"``.

    Raises:
        ReportError: nothing to plot, or the folder of ``path`` does not exist.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise ReportError(f"cannot write the plot to {path}: folder {path.parent} does not exist")
    target = frame[~frame["condition"].isin(SOURCE_CONDITIONS)]
    if target.empty:
        raise ReportError("nothing to plot: no completed target-task trials with a test value")
    # A Figure with an Agg canvas renders without touching pyplot's global backend or state.
    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if set(target["condition"]) == {"single"}:
        _draw_single(axes, target)
    else:
        _draw_transfer(axes, target)
    axes.set_title(title)
    axes.set_ylabel(f"test {metric_name} (target task)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small", frameon=False)
    save_png(figure, path)
    return path


def _draw_transfer(axes: Any, frame: pd.DataFrame) -> None:
    import numpy as np

    rng = np.random.default_rng(0)  # the same jitter on every run
    for condition in _ordered_conditions(frame["condition"].unique()):
        rows = frame[frame["condition"] == condition]
        style = PLOT_STYLES.get(condition, _DEFAULT_STYLE)
        x = rows["depth"].to_numpy(float) + rng.uniform(-_JITTER, _JITTER, len(rows))
        edge = style["edgecolor"] if style["marker"] != "x" else None
        axes.scatter(
            x,
            rows["value"],
            s=22,
            marker=style["marker"],
            color=style["facecolor"],
            edgecolors=edge,
            linewidths=0.8,
            zorder=3,
            label=condition,
        )
        means = rows.groupby("depth")["value"].mean()
        if condition == "baseB":
            axes.axhline(
                means.mean(), linestyle="--", color="black", linewidth=1, label="baseB mean", zorder=2
            )
        elif len(means) > 1:
            axes.plot(means.index, means.to_numpy(), color=style["color"], linewidth=1.6, zorder=2)
        else:
            axes.scatter(means.index, means.to_numpy(), s=60, marker="_", color=style["color"], zorder=2)
    max_depth = int(frame["depth"].max())
    axes.set_xticks(range(max_depth + 1))
    axes.set_xlim(-0.5, max_depth + 0.5)
    axes.set_xlabel("depth n (first n stages copied and/or frozen)")


def _draw_single(axes: Any, frame: pd.DataFrame) -> None:
    style = PLOT_STYLES["single"]
    axes.scatter(
        frame["seed"],
        frame["value"],
        s=30,
        marker=style["marker"],
        color=style["facecolor"],
        zorder=3,
        label="trial",
    )
    axes.axhline(frame["value"].mean(), linestyle="--", color="black", linewidth=1, label="mean")
    axes.set_xticks(sorted(frame["seed"].unique()))
    axes.set_xlabel("seed")


def save_png(figure: Any, path: str | os.PathLike[str]) -> None:
    """Write a matplotlib ``figure`` as a PNG (150 dpi, mode 644) at ``path`` atomically: to a temporary
    file beside it, then renamed over it, so no reader sees half a file. Every report figure uses it."""
    from transferlab.atomic import atomic_path

    with atomic_path(path, mode=0o644) as temporary:  # a plot is for sharing, not private
        figure.savefig(temporary, format="png", dpi=150)
