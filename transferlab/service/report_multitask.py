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


def paired_values(values: pd.DataFrame) -> tuple[pd.DataFrame, dict[tuple[str, str, int], str]]:
    """Each multitask value beside the single-task value of the same task, depth and seed.

    Where a task has baseline values at a depth, a (weighting, task, depth) keeps only the seeds with
    a value on both sides, so a change never compares different seed sets; where it has none (no
    baselines, or none of them completed) or no seed pairs up, the multitask values stand alone
    (``single`` NaN). Returns the rows (weighting, task, depth, seed, value, single) and, for each
    (weighting, task, depth) with unpaired seeds, a phrase naming them.
    """
    keys = ["task", "depth", "seed"]
    multi = values.loc[values["kind"] == "multitask", ["weighting", *keys, "value"]]
    single = values.loc[values["kind"] == "single", [*keys, "value"]].rename(columns={"value": "single"})
    # Every baseline seed under every weighting run at that (task, depth), then matched by seed.
    runs = multi[["weighting", "task", "depth"]].drop_duplicates()
    baselines = runs.merge(single, on=["task", "depth"])
    both = multi.merge(baselines, on=["weighting", *keys], how="outer")
    paired = both["value"].notna() & both["single"].notna()
    run = [both["weighting"], both["task"], both["depth"]]
    has_pairs = paired.groupby(run).transform("any")
    has_baseline = both["single"].notna().groupby(run).transform("any")
    unpaired = both[~paired & has_baseline].groupby(["weighting", "task", "depth"], sort=True)
    notes = {(w, t, int(d)): _seeds_without(rows) for (w, t, d), rows in unpaired}
    keep = paired | (~has_pairs & both["value"].notna())
    return both[keep].reset_index(drop=True), notes


def _seeds_without(rows: pd.DataFrame) -> str:
    """``seed 1 has no multitask value, seeds 2, 3 have no single-task value``."""
    parts = []
    for missing, side in (("value", "multitask"), ("single", "single-task")):
        seeds = sorted(int(s) for s in rows.loc[rows[missing].isna(), "seed"])
        if seeds:
            many = len(seeds) > 1
            listed = ", ".join(map(str, seeds))
            parts.append(f"seed{'s' if many else ''} {listed} {'have' if many else 'has'} no {side} value")
    return ", ".join(parts)


def multitask_frame(store: Store, experiment_id: int | str) -> pd.DataFrame:
    """The multitask comparison: one row per (task, weighting, freeze depth) over completed trials.

    Multitask and single-task values are paired by seed first (``paired_values``): where a task has a
    baseline, both sides are taken over the same seeds. Columns (``MULTITASK_COLUMNS``): task, metric,
    higher_is_better; weighting, depth; mean, std, n of the multitask test value (n = the seed pairs,
    or every seed without a baseline); single_mean, single_std, single_n of the single-task baseline at
    the same depth over the same seeds (NaN and 0 without one); change_pct (positive = better than
    alone); negative_transfer (change < 0; missing without a baseline); delta_m_pct (the weighting's
    mean change over all tasks at that depth; NaN unless every task has a change). ``frame.attrs``
    holds ``summary`` (a one-line account of the trials and the seeds left unpaired), ``unpaired``
    (those seeds, one line per task, weighting and depth) and ``weightings`` / ``tasks`` in spec order.
    """
    info = store.find_experiment(experiment_id)
    trials = store.trials(info.id)
    facts = task_metrics(trials)
    values = trial_values(store, info.id)
    weightings = list(dict.fromkeys(t.condition for t in trials if t.role == "multitask"))
    pairs, notes = paired_values(values)
    group = pairs.groupby(["task", "weighting", "depth"])
    frame = group["value"].agg(mean="mean", std="std", n="count")
    frame = frame.join(group["single"].agg(single_mean="mean", single_std="std", single_n="count"))
    frame = frame.reset_index()
    frame["metric"] = frame["task"].map(lambda k: facts[k].metric)
    frame["higher_is_better"] = frame["task"].map(lambda k: facts[k].higher_is_better)
    sign = frame["task"].map(lambda k: facts[k].sign).astype("float64")
    base = frame["single_mean"].where(frame["single_mean"] != 0)
    frame["change_pct"] = sign * (frame["mean"] - base) / base.abs() * 100
    frame["negative_transfer"] = (frame["change_pct"] < 0).astype("boolean").mask(frame["change_pct"].isna())
    frame["delta_m_pct"] = frame.groupby(["weighting", "depth"])["change_pct"].transform(
        lambda c: c.mean() if c.notna().all() and len(c) == len(facts) else math.nan
    )
    order = {"task": list(facts), "weighting": weightings}
    frame = frame.sort_values(
        ["depth", "weighting", "task"],
        key=lambda c: c.map(order[c.name].index) if c.name in order else c,
    )
    frame = frame[list(MULTITASK_COLUMNS)].reset_index(drop=True)
    rank = {w: i for i, w in enumerate(weightings)} | {t: i for i, t in enumerate(facts)}
    unpaired = [
        f"{t} under {w} at depth {d}: {notes[w, t, d]}"
        for w, t, d in sorted(notes, key=lambda k: (k[2], rank.get(k[0], 0), rank.get(k[1], 0)))
    ]
    frame.attrs.update(
        summary=_summary(values, info.trial_counts, unpaired),
        unpaired=unpaired,
        tasks=list(facts),
        weightings=weightings,
        name=info.name,
    )
    return frame


def _summary(values: pd.DataFrame, counts: dict[str, int], unpaired: list[str]) -> str:
    """``4 multitask and 4 single-task trials with test values; left out: 1 failed; unpaired ...``."""
    n_multi = values.loc[values["kind"] == "multitask", "trial_id"].nunique()
    n_single = values.loc[values["kind"] == "single", "trial_id"].nunique()
    parts = [f"{n_multi} multitask and {n_single} single-task trials with test values"]
    left_out = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "completed" and n)
    if left_out:
        parts.append(f"left out: {left_out}")
    if unpaired:
        parts.append(_unpaired_text(unpaired))
    return "; ".join(parts)


def _unpaired_text(unpaired: list[str]) -> str:
    return f"unpaired seeds, left out of the comparison: {'; '.join(unpaired)}"


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
        flat = caption.replace(":\n", ": ").replace("\n", "; ")
        return "\n".join([*lines, "", f"_{flat}_"]) + "\n"
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
            # The single column shows the baseline over the most seed pairs; a weighting compared
            # with fewer (other seeds) names its own baseline value in its cell.
            first = task_rows.loc[task_rows["single_n"].idxmax()]
            arrow = "↑" if first["higher_is_better"] else "↓"
            cells = {}
            for _, r in task_rows.iterrows():
                text = _cell(r["mean"], r["std"], int(r["n"]), common, digits)
                if not math.isnan(r["change_pct"]):
                    other = r["single_n"] != first["single_n"] or r["single_mean"] != first["single_mean"]
                    versus = f" vs {r['single_mean']:.{digits}f}" if other else ""
                    mark = NEGATIVE_MARK if r["change_pct"] < 0 else ""
                    text += f" ({r['change_pct']:+.1f}%{mark}{versus})"
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
    summary, unpaired = frame.attrs.get("summary", ""), frame.attrs.get("unpaired", [])
    if unpaired:  # one line per unpaired (task, weighting, depth) rather than one long line
        summary = summary.removesuffix(f"; {_unpaired_text(unpaired)}")
        summary = "\n".join([summary, "unpaired seeds, left out of the comparison:", *unpaired])
    if frame.empty:
        return f"no completed multitask trials with a test value yet\n{summary}"
    lines = [
        f"test value of each task's primary metric, mean ± std over n={_common_n(frame)} seeds "
        "(unless marked); ↑/↓: higher/lower is better",
        "(+x%): change over the task trained alone at the same depth, positive = better; "
        f"{NEGATIVE_MARK}: negative transfer",
        f"Δm: the weighting's mean change over the tasks (Maninis et al. 2019), best {best}",
    ]
    if frame.attrs.get("unpaired"):
        lines.append(
            "a change compares only seeds with both values (n = pairs); 'vs x': the single-task value "
            "of that weighting's pairs"
        )
    if frame["single_n"].eq(0).all() and not frame.attrs.get("unpaired"):
        lines.append("no single-task baselines (multitask.single_task_baselines: false): no changes")
    return "\n".join([*lines, summary])
