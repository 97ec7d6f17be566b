"""The three figures of a multitask study, written from one call.

``FILE.png``: each task's test metric by weighting (bars, mean ± std over seeds), the task trained
alone as a dashed line; ``FILE-weights.png``: each strategy's task weights over the training epochs;
``FILE-change.png``: the relative change over single-task training (tasks and Delta_m x weightings)
as a heatmap with the values in the cells. Matplotlib's Agg ``Figure`` (no pyplot state); each PNG is
written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from transferlab.service.report import ReportError, save_png
from transferlab.service.store import Store

FIGURE_SUFFIXES = ("", "-weights", "-change")
_COLUMNS_PER_ROW = 3


def figure_paths(path: str | os.PathLike[str]) -> list[Path]:
    """``x.png`` -> ``[x.png, x-weights.png, x-change.png]``."""
    path = Path(path)
    return [path.with_name(f"{path.stem}{suffix}{path.suffix or '.png'}") for suffix in FIGURE_SUFFIXES]


def weights_frame(store: Store, experiment_id: int) -> pd.DataFrame:
    """The task weights each completed multitask trial recorded per epoch (``train/weight/<key>``).

    Columns: weighting, depth, seed, epoch, task, weight.
    """
    completed = {
        t.id for t in store.trials(experiment_id) if t.status == "completed" and t.role == "multitask"
    }
    rows = store.metrics_frame(experiment_id, split="train")
    rows = rows[rows["trial_id"].isin(completed) & rows["name"].str.startswith("weight/")]
    return pd.DataFrame(
        {
            "weighting": rows["condition"],
            "depth": rows["depth"],
            "seed": rows["seed"],
            "epoch": rows["epoch"],
            "task": rows["name"].str.removeprefix("weight/"),
            "weight": rows["value"],
        }
    ).reset_index(drop=True)


def plot_multitask(
    frame: pd.DataFrame, weights: pd.DataFrame, path: str | os.PathLike[str], *, title: str
) -> list[Path]:
    """Write the three figures of a multitask study; return their paths (see ``figure_paths``).

    Args:
        frame: a :func:`~transferlab.service.report_multitask.multitask_frame`.
        weights: a :func:`weights_frame`.
        path: the first PNG; the other two are written beside it.
        title: the figure titles' prefix.

    Raises:
        ReportError: nothing to plot, or the folder of ``path`` does not exist.
    """
    paths = figure_paths(path)
    if not paths[0].parent.is_dir():
        raise ReportError(f"cannot write the plot to {paths[0]}: folder {paths[0].parent} does not exist")
    if frame.empty:
        raise ReportError("nothing to plot: no completed multitask trials with a test value")
    for draw, out in zip((_draw_metrics, _draw_weights, _draw_change), paths, strict=True):
        figure = draw(frame, weights, title)
        save_png(figure, out)
    return paths


def _figure(panels: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, _COLUMNS_PER_ROW)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _order(frame: pd.DataFrame, column: str) -> list[str]:
    listed = [v for v in frame.attrs.get(f"{column}s", []) if v in set(frame[column])]
    return listed + sorted(set(frame[column]) - set(listed))


def _draw_metrics(frame: pd.DataFrame, weights: pd.DataFrame, title: str) -> Any:
    """One panel per task: bars per weighting (one per depth), the single-task value dashed."""
    import numpy as np

    tasks, weightings = _order(frame, "task"), _order(frame, "weighting")
    depths = sorted(frame["depth"].unique())
    figure, axes = _figure(len(tasks), width=max(4.2, 0.55 * len(weightings) * len(depths) + 1.5))
    colors = [f"C{i}" for i in range(len(depths))]
    width = 0.8 / len(depths)
    x = np.arange(len(weightings))
    for ax, task in zip(axes, tasks, strict=True):
        rows = frame[frame["task"] == task]
        for i, depth in enumerate(depths):
            at = rows[rows["depth"] == depth].set_index("weighting").reindex(weightings)
            label = f"multitask, depth {depth}" if len(depths) > 1 else "multitask"
            spread = at["std"] if at["std"].notna().any() else None  # one seed: no error bars
            ax.bar(
                x + (i - (len(depths) - 1) / 2) * width,
                at["mean"],
                width,
                yerr=spread.fillna(0) if spread is not None else None,
                color=colors[i],
                alpha=0.85,
                capsize=2,
                label=label,
            )
            alone = at.dropna(subset=["single_mean"])
            if not alone.empty:  # the baseline over the most seed pairs (all of them, unless one failed)
                tag = f"single-task, depth {depth}" if len(depths) > 1 else "single-task"
                value = alone.loc[alone["single_n"].idxmax(), "single_mean"]
                ax.axhline(value, linestyle="--", color=colors[i], linewidth=1.2, label=tag)
        first = rows.iloc[0]
        arrow = "higher" if first["higher_is_better"] else "lower"
        ax.set_title(f"{task}: {first['metric']} ({arrow} is better)", fontsize="medium")
        ax.set_xticks(x, weightings, rotation=30, ha="right")
        ax.set_ylabel(f"test {first['metric']}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False)
    figure.suptitle(f"{title}: each task's test metric by loss weighting")
    return figure


def _draw_weights(frame: pd.DataFrame, weights: pd.DataFrame, title: str) -> Any:
    """One panel per weighting: each task's weight over the epochs (mean over seeds)."""
    from matplotlib.ticker import MaxNLocator

    weightings = _order(frame, "weighting")
    tasks = _order(frame, "task")
    figure, axes = _figure(len(weightings), width=3.4, height=2.6)
    depths = sorted(weights["depth"].unique()) if not weights.empty else []
    styles = ["-", "--", ":", "-."]
    for ax, weighting in zip(axes, weightings, strict=True):
        rows = weights[weights["weighting"] == weighting]
        if rows.empty:
            ax.text(0.5, 0.5, "no weights recorded", ha="center", va="center", transform=ax.transAxes)
        for t_index, task in enumerate(tasks):
            for d_index, depth in enumerate(depths):
                curve = (
                    rows[(rows["task"] == task) & (rows["depth"] == depth)].groupby("epoch")["weight"].mean()
                )
                if curve.empty:
                    continue
                label = task if len(depths) == 1 else f"{task}, depth {depth}"
                ax.plot(
                    curve.index,
                    curve.to_numpy(),
                    styles[d_index % len(styles)],
                    color=f"C{t_index}",
                    marker="o",
                    markersize=3,
                    label=label,
                )
        ax.set_title(weighting, fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("task weight")
        ax.grid(alpha=0.3)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[1]))
    if labels:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)), frameon=False)
    figure.suptitle(f"{title}: task weights over training")
    return figure


def _draw_change(frame: pd.DataFrame, weights: pd.DataFrame, title: str) -> Any:
    """One heatmap per depth: change over single-task training (%), tasks and Delta_m x weightings."""
    import numpy as np
    from matplotlib import colormaps

    cmap = colormaps["RdBu"].with_extremes(bad="#dddddd")  # red = worse than alone, blue = better
    weightings, tasks = _order(frame, "weighting"), _order(frame, "task")
    depths = sorted(frame["depth"].unique())
    figure, axes = _figure(
        len(depths), width=max(4.5, 0.9 * len(weightings) + 2), height=0.6 * len(tasks) + 2
    )
    finite = frame["change_pct"].dropna()
    limit = max(1.0, float(finite.abs().max())) if not finite.empty else 1.0
    for ax, depth in zip(axes, depths, strict=True):
        at = frame[frame["depth"] == depth]
        matrix = at.pivot(index="task", columns="weighting", values="change_pct").reindex(
            index=tasks, columns=weightings
        )
        delta = at.groupby("weighting")["delta_m_pct"].first().reindex(weightings)
        values = np.vstack([matrix.to_numpy(float), delta.to_numpy(float)[None, :]])
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        for (row, col), value in np.ndenumerate(values):
            text = "n/a" if math.isnan(value) else f"{value:+.1f}"
            dark = not math.isnan(value) and abs(value) > 0.6 * limit
            ax.text(
                col, row, text, ha="center", va="center", fontsize="small", color="white" if dark else "black"
            )
        ax.axhline(len(tasks) - 0.5, color="black", linewidth=1.5)
        ax.set_xticks(range(len(weightings)), weightings, rotation=30, ha="right")
        ax.set_yticks(range(len(tasks) + 1), [*tasks, "Δm (mean)"])
        ax.set_title(f"freeze depth {depth}", fontsize="medium")
        figure.colorbar(image, ax=ax, label="change over single-task (%), + = better", shrink=0.9)
    if frame["single_n"].eq(0).all() and not frame.attrs.get("unpaired"):
        figure.text(0.5, 0.5, "no single-task baselines in this experiment", ha="center", fontsize="large")
    figure.suptitle(f"{title}: relative change over single-task training")
    return figure
