"""``status``, ``results``, ``plot``, ``query`` and ``logs``: reading the store (and the Ray jobs)."""

from __future__ import annotations

from typing import Any

import click

from transferlab.cli.cluster import cluster_address_option
from transferlab.cli.options import console, db_option, output_option, print_frame


def show_results(experiment: str, db: str | None, output: str) -> None:
    """Print the depth x condition table of an experiment (a multitask study: tasks x weightings)."""
    from transferlab.service.api import open_store
    from transferlab.service.report import format_results, pivot_results, results_frame

    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        if info.study == "multitask":
            from transferlab.service.report_multitask import multitask_frame

            frame = multitask_frame(store, info.id)
        else:
            frame = results_frame(store, info.id)
        counts = store.trial_counts(info.id)
    finally:
        store.close()
    if frame.empty and info.study == "multitask":
        # Baselines alone give no row: say what is missing, not that nothing completed.
        raise click.ClickException(
            f"experiment {info.id} ({info.name}, {info.status}) has no completed multitask trial with a "
            f"test value, so there is nothing to compare ({frame.attrs['summary']}; trials by status: "
            f"{counts})"
        )
    if frame.empty:
        raise click.ClickException(
            f"experiment {info.id} ({info.name}, {info.status}) has no completed trials "
            f"(trials by status: {counts})"
        )
    if info.study == "multitask":
        from transferlab.service.report_multitask import format_multitask

        title = f"{info.name} (experiment {info.id}): multitask vs single-task, test metric per task"
        click.echo(format_multitask(frame, output, title=title), nl=False)
        return
    pivot = pivot_results(frame, info.higher_is_better)
    click.echo(
        format_results(
            pivot,
            output,
            title=f"{info.name} (experiment {info.id}): test {info.primary_metric}, mean ± std over seeds",
        )
    )


def find_jobs(db: str | None, address: str | None) -> Any | None:
    """The Ray jobs of this store's experiments; ``None`` when no cluster answers.

    ``status`` then shows the store's view alone (with a note when ADDR was given explicitly).
    """
    from transferlab.service.driver import DriverError
    from transferlab.service.jobs import experiment_jobs

    try:
        return experiment_jobs(db, address)
    except DriverError as exc:
        if address:
            click.echo(f"note: no Ray job states: {exc}", err=True)
        return None


def job_state(job: Any) -> str:
    """``SUCCEEDED (job transferlab-tiny-3-a1b2c3)``, with Ray's message for a failed or stopped job."""
    state = _short_state(job)
    why = f": {job.message}" if state in ("FAILED", "STOPPED") and job.message else ""
    return f"{state} (job {job.submission_id}){why}"


def _short_state(job: Any | None) -> str:
    return "" if job is None else getattr(job.status, "value", str(job.status))


@click.command()
@click.argument("experiment", required=False)
@db_option
@output_option
@cluster_address_option
def status(experiment: str | None, db: str | None, output: str, address: str | None) -> None:
    """List experiments, or the trials of EXPERIMENT (an id or a name).

    For an experiment run as a Ray Job (`submit --detach`) the job's state is shown too, when its
    cluster answers (ADDR, else the local head).
    """
    import pandas as pd

    from transferlab.service.api import open_store

    store = open_store(db, create=False)
    try:
        if experiment is None:
            infos = store.experiments()
            jobs = find_jobs(db, address) if infos else None
            rows = [
                {
                    "id": e.id,
                    "name": e.name,
                    "study": e.study,
                    "status": e.status,
                    "trials": " ".join(f"{k}:{v}" for k, v in sorted(e.trial_counts.items())),
                    "created": e.created_at.strftime("%Y-%m-%d %H:%M"),
                    "job": _short_state(jobs.latest(e.id)) if jobs else "",
                }
                for e in infos
            ]
            columns = ["id", "name", "study", "status", "trials", "created"]
            if jobs and jobs.by_experiment:
                columns.append("job")  # the state of its latest Ray job
            print_frame(pd.DataFrame(rows, columns=columns), output, title="experiments")
            return
        info = store.find_experiment(experiment)
        jobs = find_jobs(db, address)
        trials = store.trial_table(info.id)[["id", "key", "condition", "depth", "seed", "status", "error"]]
        trials = trials.fillna({"error": ""})
    finally:
        store.close()
    job = jobs.latest(info.id) if jobs else None
    if job is not None and output == "table":
        click.echo(f"Ray job: {job_state(job)}")
    print_frame(trials, output, title=f"{info.name} (experiment {info.id}): {info.status}")


@click.command()
@click.argument("experiment")
@db_option
@output_option
def results(experiment: str, db: str | None, output: str) -> None:
    """Depth x condition table of EXPERIMENT's primary test metric, mean ± std over seeds."""
    show_results(experiment, db, output)


@click.command()
@click.argument("experiment")
@click.option(
    "-o", "--out", "path", required=True, type=click.Path(dir_okay=False), help="PNG file to write."
)
@db_option
def plot(experiment: str, path: str, db: str | None) -> None:
    """Write EXPERIMENT's figure: target accuracy against depth n, one marker per condition.

    A multitask study gets three: OUT (each task's metric by weighting), OUT-weights.png (task
    weights over epochs) and OUT-change.png (change over single-task training, as a heatmap).
    """
    from transferlab.service.api import plot as plot_experiment

    written = plot_experiment(experiment, path, db=db)
    console().print(
        f"{'figure' if len(written) == 1 else 'figures'} written to "
        + ", ".join(f"[bold]{p}[/]" for p in written)
    )


@click.command()
@click.argument("sql")
@db_option
@output_option
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Stop the statement after this many seconds.",
)
def query(sql: str, db: str | None, output: str, timeout_s: float) -> None:
    """Run one read-only SQL statement against the store; the connection itself refuses writes.

    Tables: experiments, trials, metrics (long format: trial_id, epoch, split, name, value).
    """
    from transferlab.service.api import query as run_query

    print_frame(run_query(sql, db=db, timeout_s=timeout_s), output)


@click.command()
@click.argument("experiment")
@db_option
@cluster_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def logs(experiment: str, db: str | None, address: str | None, follow: bool) -> None:
    """Print the driver output of EXPERIMENT's Ray Job (a study submitted with `submit --detach`)."""
    from transferlab.service.api import open_store
    from transferlab.service.jobs import experiment_jobs, job_logs

    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
    finally:
        store.close()
    jobs = experiment_jobs(db, address)
    job = jobs.latest(info.id)
    if job is None:
        raise click.ClickException(
            f"experiment {info.id} ({info.name}) was not run as a Ray job on the cluster at "
            f"{jobs.address}: no job there names it in its metadata. `transferlab submit --detach` runs a "
            "study as a job; a study run in the foreground printed its output in its own terminal "
            f"(`transferlab status {info.id}` shows its trials)"
        )
    if len(jobs.by_experiment[info.id]) > 1:
        click.echo(f"(the latest of {len(jobs.by_experiment[info.id])} jobs: {job.submission_id})", err=True)
    for chunk in job_logs(jobs, job.submission_id, follow=follow):
        click.echo(chunk, nl=False)
