"""``status``, ``results``, ``plot`` and ``query``: reading the store."""

from __future__ import annotations

import click

from transferlab.cli.options import console, db_option, output_option, print_frame


def show_results(experiment: str, db: str | None, output: str) -> None:
    """Print the depth x condition table of an experiment."""
    from transferlab.service.api import open_store
    from transferlab.service.report import format_results, pivot_results, results_frame

    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        frame = results_frame(store, info.id)
        counts = store.trial_counts(info.id)
    finally:
        store.close()
    if frame.empty:
        raise click.ClickException(
            f"experiment {info.id} ({info.name}, {info.status}) has no completed trials "
            f"(trials by status: {counts})"
        )
    pivot = pivot_results(frame, info.higher_is_better)
    click.echo(
        format_results(
            pivot,
            output,
            title=f"{info.name} (experiment {info.id}): test {info.primary_metric}, mean ± std over seeds",
        )
    )


@click.command()
@click.argument("experiment", required=False)
@db_option
@output_option
def status(experiment: str | None, db: str | None, output: str) -> None:
    """List experiments, or the trials of EXPERIMENT (an id or a name)."""
    import pandas as pd

    from transferlab.service.api import open_store

    store = open_store(db, create=False)
    try:
        if experiment is None:
            rows = [
                {
                    "id": e.id,
                    "name": e.name,
                    "study": e.study,
                    "status": e.status,
                    "trials": " ".join(f"{k}:{v}" for k, v in sorted(e.trial_counts.items())),
                    "created": e.created_at.strftime("%Y-%m-%d %H:%M"),
                }
                for e in store.experiments()
            ]
            print_frame(
                pd.DataFrame(rows, columns=["id", "name", "study", "status", "trials", "created"]),
                output,
                title="experiments",
            )
            return
        info = store.find_experiment(experiment)
        rows = [
            {
                "id": t.id,
                "key": t.key,
                "condition": t.condition,
                "depth": t.depth,
                "seed": t.seed,
                "status": t.status,
                "error": t.error or "",
            }
            for t in store.trials(info.id)
        ]
    finally:
        store.close()
    print_frame(pd.DataFrame(rows), output, title=f"{info.name} (experiment {info.id}): {info.status}")


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
    """Write EXPERIMENT's figure: target accuracy against depth n, one marker per condition."""
    from transferlab.service.api import plot as plot_experiment

    plot_experiment(experiment, path, db=db)
    console().print(f"figure written to [bold]{path}[/]")


@click.command()
@click.argument("sql")
@db_option
@output_option
def query(sql: str, db: str | None, output: str) -> None:
    """Run read-only SQL against the store; the connection itself refuses writes.

    Tables: experiments, trials, metrics (long format: trial_id, epoch, split, name, value).
    """
    from transferlab.service.api import query as run_query

    print_frame(run_query(sql, db=db), output)
