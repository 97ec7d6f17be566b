"""``demo``, ``validate`` and ``submit``: from a spec to a finished study."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from transferlab.cli.cluster import apply_shared_runs, shared_runs_option
from transferlab.cli.options import console, db_option

address_option = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    metavar="ADDR",
    help="Ray cluster to run on (default: start a local Ray sized to this machine).",
)
plot_option = click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results figure to this PNG.",
)
runs_option = click.option(
    "--runs-dir",
    envvar="TRANSFERLAB_RUNS",
    default=None,
    type=click.Path(file_okay=False),
    help="Where checkpoints and Ray Tune files go [env TRANSFERLAB_RUNS; default ./transferlab-runs].",
)


class ProgressPrinter:
    """Shows a progress bar over trials and one line per finished trial.

    ``configs`` maps trial keys to their configs: each trial's line shows its own primary metric
    (base net A of a cross-task study, a multitask study's single-task baselines), and a multitask
    trial's line adds each task's primary test metric beside its score.
    """

    def __init__(self, metric: str, configs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console()
        self.metric = metric
        self.configs = dict(configs or {})
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=True,
        )
        self.task_id: Any = None

    def _metric(self, key: str) -> str:
        return str(self.configs.get(key, {}).get("primary_metric") or self.metric)

    def _test_line(self, key: str, data: Mapping[str, Any]) -> str:
        """``test accuracy 0.9120``; a multitask trial: ``test score 0.71 (cls accuracy 0.91, ...)``."""
        metric = self._metric(key)
        text = f"test {metric} {_number(data.get(f'test/{metric}'))}"
        task_metrics = self.configs.get(key, {}).get("task_metrics") or {}
        parts = []
        for task, facts in task_metrics.items():
            name = facts["primary_metric"]
            parts.append(f"{task} {name} {_number(data.get(f'test/{task}/{name}'))}")
        return f"{text} ({', '.join(parts)})" if parts else text

    def on_created(self, experiment_id: int, trials: list) -> None:
        self.console.print(f"experiment [bold]{experiment_id}[/]: {len(trials)} trials to run")
        self.task_id = self.progress.add_task("starting Ray", total=len(trials))
        self.progress.start()

    def on_event(self, kind: str, trial: Any, data: dict[str, Any]) -> None:
        name = f"{trial.condition} d{trial.depth} s{trial.seed}"
        metric = self._metric(trial.key)
        if kind == "epoch":
            value = data.get(f"val/{metric}")
            shown = f", val {metric} {value:.3f}" if isinstance(value, float) else ""
            self.progress.update(self.task_id, description=f"{name}: epoch {data.get('epoch')}{shown}")
            return
        if kind == "start":
            self.progress.update(self.task_id, description=f"{name}: started")
            return
        self.progress.advance(self.task_id)
        if kind == "completed":
            self.console.print(f"[green]done[/]    {trial.key:<28} {self._test_line(trial.key, data)}")
        elif kind == "failed":
            self.console.print(f"[red]failed[/]  {trial.key:<28} {data.get('error')}")
        else:
            self.console.print(f"[yellow]{kind}[/] {trial.key:<28} {data.get('error', '')}")

    def stop(self) -> None:
        if self.task_id is not None:  # never started when the study was refused before running
            self.progress.stop()


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _print_plan(vspec: Any, output: str) -> None:
    from transferlab.service.planner import plan_summary, plan_trials

    trials = plan_trials(vspec)
    summary = plan_summary(trials)
    if output == "json":
        data = {
            "name": vspec.spec.name,
            "study": vspec.spec.study,
            "trials": len(trials),
            "stages": list(vspec.stage_names),
            **{k: {str(kk): vv for kk, vv in v.items()} for k, v in summary.items()},
        }
        if vspec.multitask_tasks:
            data["tasks"] = {
                key: {"task": f.task_name, "head": f.head_name, "primary_metric": f.primary_metric}
                for key, f in vspec.multitask_tasks.items()
            }
        click.echo(json.dumps(data, indent=2))
        return
    from rich.table import Table

    out = console()
    spec = vspec.spec
    trunk = (
        f"[bold]{spec.name}[/] ({spec.study} study): [bold]{len(trials)}[/] trials; backbone "
        f"{spec.backbone.name} ({len(vspec.stage_names)} stages: {', '.join(vspec.stage_names)})"
    )
    if vspec.multitask_tasks:
        out.print(f"{trunk}, shared by {len(vspec.multitask_tasks)} tasks (model selection: val score)")
        for key, f in vspec.multitask_tasks.items():
            target = f.task_options.get("target")
            task = f"{f.task_name} ({target})" if target else f.task_name
            out.print(f"  {key}: task {task}, head {f.head_name} (primary metric {f.primary_metric})")
    else:
        out.print(
            f"{trunk}, head {spec.head.name}, task {spec.study_task.name} "
            f"(primary metric {vspec.primary_metric})"
        )
    source = spec.transfer.source if spec.transfer is not None else None
    if source is not None:
        out.print(
            f"base net A (cross-task source): head {source.head.name}, task {source.task.name} "
            f"(primary metric {vspec.source_primary_metric})"
        )
    depths = sorted(summary["depth"])
    conditions = list(dict.fromkeys(t.condition for t in trials))
    title = "trials per condition (rows) and depth (columns)"
    if vspec.multitask_tasks:
        title = "trials per weighting or single:<task> baseline (rows) and freeze depth (columns)"
    out.print(title, highlight=False)  # above the table, not its title: a title wraps at its width
    table = Table()
    table.add_column("condition")
    for d in depths:
        table.add_column(f"d{d}", justify="right")
    table.add_column("total", justify="right")
    for c in conditions:
        counts = [sum(1 for t in trials if t.condition == c and t.depth == d) for d in depths]
        table.add_row(c, *(str(n) if n else "" for n in counts), str(sum(counts)))
    out.print(table)
    for what in ("role", "seed", "split"):
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(summary[what].items(), key=lambda kv: str(kv[0])))
        out.print(f"trials per {what}: {parts}")


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def validate(spec: str, output: str) -> None:
    """Check SPEC completely and print its trial plan; writes nothing."""
    from transferlab.service.api import validate as validate_spec

    _print_plan(validate_spec(spec), output)


def _run(vspec: Any, db: str | None, address: str | None, runs_dir: str | None) -> int:
    from transferlab.service.api import submit as submit_spec
    from transferlab.service.planner import plan_trials

    printer = ProgressPrinter(vspec.primary_metric, {t.key: t.config(vspec) for t in plan_trials(vspec)})
    try:
        exp_id = submit_spec(
            vspec,
            db=db,
            address=address,
            runs_dir=runs_dir,
            on_event=printer.on_event,
            on_created=printer.on_created,
        )
    finally:
        printer.stop()
    return exp_id


@click.command()
@click.argument("experiment")
@db_option
@address_option
@plot_option
@shared_runs_option
def resume(
    experiment: str, db: str | None, address: str | None, plot_path: str | None, shared_runs_dir: bool
) -> None:
    """Finish EXPERIMENT after a crash or Ctrl-C: rerun every trial that did not complete, fail or skip.

    Completed trials are kept as they are; interrupted trials continue from their last finished epoch.
    """
    from transferlab.service.api import open_store
    from transferlab.service.api import resume as resume_experiment

    apply_shared_runs(shared_runs_dir)
    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        configs = {t.key: t.config for t in store.trials(info.id)}
    finally:
        store.close()
    printer = ProgressPrinter(info.primary_metric, configs)
    try:
        exp_id = resume_experiment(
            experiment, db=db, address=address, on_event=printer.on_event, on_created=printer.on_created
        )
    finally:
        printer.stop()
    _summarise(exp_id, db, plot_path)


def _summarise(exp_id: int, db: str | None, plot_path: str | None) -> None:
    """Print the results table (and write the figure); a study with failed trials exits non-zero."""
    from transferlab.cli.reports import show_results
    from transferlab.service.api import open_store

    show_results(str(exp_id), db, "table")
    if plot_path:
        from transferlab.service.api import plot

        written = plot(exp_id, plot_path, db=db)
        noun = "figure" if len(written) == 1 else "figures"
        console().print(f"{noun} written to {', '.join(f'[bold]{p}[/]' for p in written)}")
    store = open_store(db, create=False)
    try:
        info = store.find_experiment(exp_id)
        counts = store.trial_counts(exp_id)
    finally:
        store.close()
    if info.status != "completed":
        problems = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "completed")
        raise click.ClickException(
            f"experiment {exp_id} finished with {problems} trials; `transferlab status {exp_id}` shows why"
        )


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@db_option
@address_option
@runs_option
@plot_option
@click.option(
    "--detach",
    is_flag=True,
    help="Record the study and run it as a Ray Job on the cluster (--address, else the head "
    "`transferlab cluster up` started); return at once. The job outlives this terminal.",
)
@shared_runs_option
def submit(
    spec: str,
    db: str | None,
    address: str | None,
    runs_dir: str | None,
    plot_path: str | None,
    detach: bool,
    shared_runs_dir: bool,
) -> None:
    """Validate SPEC, record it in the store and run every trial with Ray Tune."""
    from transferlab.service.api import validate as validate_spec

    if detach and plot_path:
        raise click.UsageError(
            "--plot needs the finished study: after the job, `transferlab plot EXP -o FILE`"
        )
    vspec = validate_spec(spec)
    if detach:
        from transferlab.cli.cluster import run_detached

        run_detached(vspec, db, address, runs_dir, shared_runs_dir)
        return
    apply_shared_runs(shared_runs_dir)
    exp_id = _run(vspec, db, address, runs_dir)
    _summarise(exp_id, db, plot_path)


@click.command()
@db_option
@runs_option
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default="quickstart.png",
    show_default=True,
    help="Where to write the figure.",
)
def demo(db: str | None, runs_dir: str | None, plot_path: str) -> None:
    """Run the quickstart transfer study on bundled digits, then print its table and write its figure."""
    from transferlab.service.api import embedded_spec_text
    from transferlab.service.spec import validate_spec_text

    vspec = validate_spec_text(embedded_spec_text(), "quickstart.yaml (embedded)")
    exp_id = _run(vspec, db, None, runs_dir)
    _summarise(exp_id, db, plot_path)
    console().print(
        f"results are in the store ({db or 'sqlite:///transferlab.db'}); try "
        f'`transferlab status {exp_id}` or `transferlab query "SELECT * FROM trials LIMIT 5"`'
    )
