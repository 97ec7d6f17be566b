"""Results of a multitask study: each task's metric under each weighting against the task trained alone.

For a task with primary metric m and direction sign (+1 if higher is better, else -1), the relative
change of a weighting over the single-task baseline at the same freeze depth is

    change = sign * (m_multitask - m_single) / |m_single| * 100  (percent; positive = better)

and a weighting's mean change over the tasks is Delta_m of Maninis et al. (2019), "Attentive
single-tasking of multiple tasks". A negative change is negative transfer: sharing the trunk made that
task worse than training it alone. Pure pandas over :class:`~transferlab.service.store.Store`; no torch.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from transferlab.service.report import ReportError
from transferlab.service.spec import SINGLE_PREFIX
from transferlab.service.store import Store

if TYPE_CHECKING:
    from transferlab.service.store import TrialInfo

#: One row per (task, weighting, depth), in the order of the depths, the spec's weightings and tasks.
MULTITASK_COLUMNS = (
    "task",
    "metric",
    "higher_is_better",
    "weighting",
    "depth",
    "mean",
    "std",
    "n",
    "single_mean",
    "single_std",
    "single_n",
    "change_pct",
    "negative_transfer",
    "delta_m_pct",
)
NEGATIVE_MARK = "!"


@dataclass(frozen=True)
class TaskMetric:
    """A task's primary metric and its direction."""

    metric: str
    higher_is_better: bool

    @property
    def sign(self) -> int:
        return 1 if self.higher_is_better else -1


def task_metrics(trials: list[TrialInfo]) -> dict[str, TaskMetric]:
    """Each task key's primary metric and direction, from the multitask trials' configs (spec order)."""
    for t in trials:
        recorded = t.config.get("task_metrics") if t.role == "multitask" else None
        if recorded:
            return {
                key: TaskMetric(str(m["primary_metric"]), bool(m["higher_is_better"]))
                for key, m in recorded.items()
            }
    return {}


def trial_values(store: Store, experiment_id: int) -> pd.DataFrame:
    """Each completed trial's test value of each task's primary metric (the last test epoch counts).

    Columns: trial_id, kind ("multitask" or "single"), weighting (a multitask trial's condition, "" for
    a baseline), task, depth, seed, value.
    """
    trials = store.trials(experiment_id)
    facts = task_metrics(trials)
    completed = {t.id: t for t in trials if t.status == "completed"}
    test = store.metrics_frame(experiment_id, split="test")
    last = test.sort_values(["trial_id", "epoch"]).groupby(["trial_id", "name"]).tail(1)
    rows = []
    for trial_id, name, value in last[["trial_id", "name", "value"]].itertuples(index=False):
        t = completed.get(int(trial_id))
        if t is None:
            continue
        if t.role == "multitask":
            task, _, metric = name.partition("/")
            if task in facts and metric == facts[task].metric:
                rows.append((t.id, "multitask", t.condition, task, t.depth, t.seed, value))
        elif t.condition.startswith(SINGLE_PREFIX):
            task = t.condition.removeprefix(SINGLE_PREFIX)
            if task in facts and name == facts[task].metric:
                rows.append((t.id, "single", "", task, t.depth, t.seed, value))
    columns = ["trial_id", "kind", "weighting", "task", "depth", "seed", "value"]
    return pd.DataFrame(rows, columns=columns).astype({"depth": "int64", "seed": "int64", "value": "float64"})


def multitask_frame(store: Store, experiment_id: int | str) -> pd.DataFrame:
    """The multitask comparison: one row per (task, weighting, freeze depth) over completed trials.

    Columns (``MULTITASK_COLUMNS``): task, metric, higher_is_better; weighting, depth; mean, std, n of
    the multitask test value over seeds; single_mean, single_std, single_n of the single-task
    baseline at the same depth (NaN and 0 without one); change_pct (positive = better than alone);
    negative_transfer (change < 0; missing without a baseline); delta_m_pct (the weighting's mean
    change over all tasks at that depth; NaN unless every task has a change). ``frame.attrs`` holds
    ``summary`` (a one-line account of the trials) and ``weightings`` / ``tasks`` in spec order.
    """
    info = store.find_experiment(experiment_id)
    trials = store.trials(info.id)
    facts = task_metrics(trials)
    values = trial_values(store, info.id)
    weightings = list(dict.fromkeys(t.condition for t in trials if t.role == "multitask"))
    stats = {"mean": "mean", "std": "std", "n": "count"}
    multi = values[values["kind"] == "multitask"].groupby(["task", "weighting", "depth"])["value"]
    single = values[values["kind"] == "single"].groupby(["task", "depth"])["value"]
    frame = multi.agg(**stats).reset_index()
    alone = single.agg(**{f"single_{k}": v for k, v in stats.items()}).reset_index()
    frame = frame.merge(alone, on=["task", "depth"], how="left")
    frame["single_n"] = frame["single_n"].fillna(0).astype("int64")
    frame["metric"] = frame["task"].map(lambda k: facts[k].metric)
    frame["higher_is_better"] = frame["task"].map(lambda k: facts[k].higher_is_better)
    sign = frame["task"].map(lambda k: facts[k].sign).astype("float64")
    base = frame["single_mean"].where(frame["single_mean"] != 0)
    frame["change_pct"] = sign * (frame["mean"] - base) / base.abs() * 100
    frame["negative_transfer"] = (frame["change_pct"] < 0).astype("boolean").mask(frame["change_pct"].isna())
    complete = frame.groupby(["weighting", "depth"])["change_pct"].transform(
        lambda c: c.mean() if c.notna().all() and len(c) == len(facts) else math.nan
    )
    frame["delta_m_pct"] = complete
    order = {"task": list(facts), "weighting": weightings}
    frame = frame.sort_values(
        ["depth", "weighting", "task"],
        key=lambda c: c.map(order[c.name].index) if c.name in order else c,
    )
    frame = frame[list(MULTITASK_COLUMNS)].reset_index(drop=True)
    counts = info.trial_counts
    left_out = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "completed" and n)
    n_multi = values.loc[values["kind"] == "multitask", "trial_id"].nunique()
    n_single = values.loc[values["kind"] == "single", "trial_id"].nunique()
    summary = f"{n_multi} multitask and {n_single} single-task trials with test values"
    frame.attrs.update(
        summary=f"{summary}; left out: {left_out}" if left_out else summary,
        tasks=list(facts),
        weightings=weightings,
        name=info.name,
    )
    return frame


# -- formats --------------------------------------------------------------------------------------


def multitask_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as JSON-ready records (NaN and missing flags become ``None``)."""
    records = []
    for row in frame.to_dict("records"):
        records.append({k: _plain(v) for k, v in row.items()})
    return records


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def format_multitask(frame: pd.DataFrame, fmt: str, *, title: str, digits: int = 3) -> str:
    """Render ``multitask_frame`` as ``table`` or ``markdown`` (tasks x weightings per depth, with the
    single-task value, each change in percent and a Delta_m row), or ``csv``/``json`` (its rows).

    Raises:
        ReportError: an unknown format.
    """
    if fmt == "csv":
        return pd.DataFrame(multitask_records(frame), columns=list(MULTITASK_COLUMNS)).to_csv(
            index=False, lineterminator="\n"
        )
    if fmt == "json":
        return json.dumps(multitask_records(frame), indent=2, allow_nan=False) + "\n"
    if fmt not in ("table", "markdown"):
        raise ReportError(f"unknown results format {fmt!r}; choose one of table, csv, json, markdown")
    bold = "**" if fmt == "markdown" else "*"
    header, rows = _wide_rows(frame, digits, bold=bold)
    caption = _caption(frame, "in bold" if fmt == "markdown" else "marked *")
    if fmt == "markdown":
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---:" if h == "depth" else ":---" for h in header) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([*lines, "", f"_{caption.replace(chr(10), '; ')}_"]) + "\n"
    from rich.console import Console
    from rich.table import Table

    # A caption wraps at the table's width; keep the table at least as wide as its longest line.
    width = max(len(line) for line in caption.splitlines())
    table = Table(title=title, caption=caption, caption_justify="left", min_width=width)
    for h in header:
        table.add_column(h, justify="right" if h == "depth" else "left")
    for r in rows:
        table.add_row(*r, end_section=r[1] == "Δm")
    console = Console(file=io.StringIO(), record=True, width=220, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def _common_n(frame: pd.DataFrame) -> int:
    """The usual number of seeds behind a value (the most frequent; ties: the larger)."""
    counts = [int(n) for n in frame["n"]] + [int(n) for n in frame["single_n"] if n]
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else 0


def _cell(mean: float, std: float, n: int, common: int, digits: int) -> str:
    """``0.912 ± 0.013``, with ``(n=k)`` where k differs from the usual number of seeds."""
    if math.isnan(mean):
        return ""
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if n == common else f"{text} (n={n})"


def _wide_rows(frame: pd.DataFrame, digits: int, bold: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per depth, one row per task (value and change per weighting) and a Delta_m row."""
    weightings = [w for w in frame.attrs.get("weightings", []) if w in set(frame["weighting"])]
    weightings += sorted(set(frame["weighting"]) - set(weightings))
    header = ["depth", "task", "metric", "single", *weightings]
    common = _common_n(frame)
    rows: list[list[str]] = []
    for depth, at_depth in frame.groupby("depth", sort=True):
        by_task = at_depth.groupby("task", sort=False)
        for task, task_rows in by_task:
            first = task_rows.iloc[0]
            arrow = "↑" if first["higher_is_better"] else "↓"
            cells = {}
            for _, r in task_rows.iterrows():
                text = _cell(r["mean"], r["std"], int(r["n"]), common, digits)
                if not math.isnan(r["change_pct"]):
                    text += f" ({r['change_pct']:+.1f}%{NEGATIVE_MARK if r['change_pct'] < 0 else ''})"
                cells[r["weighting"]] = text
            single = _cell(first["single_mean"], first["single_std"], int(first["single_n"]), common, digits)
            row = [str(depth), str(task), f"{first['metric']} {arrow}", single]
            rows.append(row + [cells.get(w, "") for w in weightings])
        delta = at_depth.groupby("weighting")["delta_m_pct"].first()
        if delta.notna().any():
            best = delta.max()
            shown = {
                w: (f"{bold}{v:+.1f}%{bold}" if v == best else f"{v:+.1f}%") if not math.isnan(v) else ""
                for w, v in delta.items()
            }
            rows.append([str(depth), "Δm", "mean change", "", *(shown.get(w, "") for w in weightings)])
    return header, rows


def _caption(frame: pd.DataFrame, best: str) -> str:
    summary = frame.attrs.get("summary", "")
    if frame.empty:
        return f"no completed multitask trials with a test value yet\n{summary}"
    lines = [
        f"test value of each task's primary metric, mean ± std over n={_common_n(frame)} seeds "
        "(unless marked); ↑/↓: higher/lower is better",
        "(+x%): change over the task trained alone at the same depth, positive = better; "
        f"{NEGATIVE_MARK}: negative transfer",
        f"Δm: the weighting's mean change over the tasks (Maninis et al. 2019), best {best}",
    ]
    if frame["single_n"].eq(0).all():
        lines.append("no single-task baselines (multitask.single_task_baselines: false): no changes")
    return "\n".join([*lines, summary])
