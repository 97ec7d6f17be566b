"""``cluster up|down|status``: a local Ray head with its dashboard; also how ``submit --detach`` reports."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import click

from transferlab.cli.options import console

cluster_address_option = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    metavar="ADDR",
    help="The Ray cluster: its GCS address host:port or ray://host:10001 "
    "[env RAY_ADDRESS; default: the head `transferlab cluster up` started on this machine].",
)
shared_runs_option = click.option(
    "--shared-runs-dir",
    "shared_runs_dir",
    is_flag=True,
    envvar="TRANSFERLAB_SHARED_RUNS",
    help="Every node of the cluster sees the runs dir (a network file system): required for a "
    "multi-node run [env TRANSFERLAB_SHARED_RUNS=1].",
)


def apply_shared_runs(shared_runs_dir: bool) -> None:
    """Pass ``--shared-runs-dir`` on to the driver, which reads it from TRANSFERLAB_SHARED_RUNS."""
    if shared_runs_dir:
        from transferlab.service.driver import SHARED_RUNS_ENV

        os.environ[SHARED_RUNS_ENV] = "1"


@click.group()
def cluster() -> None:
    """Start, stop and inspect a Ray cluster: a head on this machine with its dashboard."""


@cluster.command()
@click.option("--port", type=int, default=6379, show_default=True, help="The head's GCS port.")
@click.option("--dashboard-port", type=int, default=8265, show_default=True, help="The dashboard's port.")
@click.option("--num-cpus", type=click.IntRange(min=0), default=None, help="CPUs to offer [default: all].")
@click.option("--num-gpus", type=click.IntRange(min=0), default=None, help="GPUs to offer [default: all].")
def up(port: int, dashboard_port: int, num_cpus: int | None, num_gpus: int | None) -> None:
    """Start a Ray head here (`ray start --head`), its dashboard on 127.0.0.1, token authentication on."""
    from transferlab.service.jobs import start_head, token_location

    click.echo("starting a Ray head...", err=True)
    head = start_head(port, dashboard_port, num_cpus, num_gpus)
    click.echo(
        f"Ray head running at {head.address} with token authentication on.\n"
        f"  cluster address  {head.address}\n"
        f"                   transferlab submit SPEC --address {head.address}  (add --detach to run it as a "
        "Ray Job that outlives this terminal)\n"
        f"  dashboard        {head.dashboard}  (this machine only; from another one: "
        f"ssh -L {dashboard_port}:127.0.0.1:{dashboard_port} THIS_HOST)\n"
        "  authenticate     the dashboard asks for Ray's token: print it with `ray get-auth-token` and "
        "paste it there.\n"
        f"                   It is kept in {token_location()}; transferlab sends it by itself, Ray's own "
        "commands (`ray job`, `ray status`) after `export RAY_AUTH_MODE=token`.\n"
        "  stop it          transferlab cluster down"
    )


@cluster.command()
@click.option("--force", is_flag=True, help="Kill Ray's processes at once instead of asking them to stop.")
def down(force: bool) -> None:
    """Stop Ray on this machine (`ray stop`).

    Ray cannot stop one instance alone: this stops EVERY Ray process of this machine, the head that
    `cluster up` started, any study running on it and any local Ray a `transferlab submit` started.
    """
    from transferlab.service.jobs import stop_head

    stopped = stop_head(force)
    click.echo(f"stopped Ray on this machine (it ran at {', '.join(stopped)})")


@cluster.command("status")
@cluster_address_option
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status_command(address: str | None, output: str) -> None:
    """Whether a Ray head runs, its address, dashboard, nodes and resources."""
    from transferlab.service.jobs import cluster_status

    info = cluster_status(address)
    if output == "json":
        click.echo(json.dumps(asdict(info), indent=2))
        return
    from rich.table import Table

    alive = sum(1 for n in info.nodes if n["alive"])
    click.echo(f"Ray cluster at {info.address}: {alive} of {len(info.nodes)} nodes alive")
    click.echo(f"dashboard: {info.dashboard or 'none'} (token authentication: {info.authentication})")
    table = Table(title="nodes", title_justify="left")
    for column in ("node", "head", "alive", "CPU", "GPU", "memory GiB"):
        table.add_column(column)
    for n in info.nodes:
        res = n["resources"]
        table.add_row(
            n["node"],
            "yes" if n["head"] else "",
            "yes" if n["alive"] else "no",
            f"{res.get('CPU', 0):g}",
            f"{res.get('GPU', 0):g}",
            f"{res.get('memory', 0) / 2**30:.1f}",
        )
    console().print(table)
    click.echo("free now: " + _free(info.total, info.available))


def _free(total: dict[str, float], available: dict[str, float]) -> str:
    """``CPU 2 of 2, GPU 0 of 0, memory 15.2 of 15.2 GiB``."""
    parts = [f"{key} {available.get(key, 0):g} of {total.get(key, 0):g}" for key in ("CPU", "GPU")]
    gib = 2**30
    parts.append(f"memory {available.get('memory', 0) / gib:.1f} of {total.get('memory', 0) / gib:.1f} GiB")
    return ", ".join(parts)


def run_detached(
    vspec: Any, db: str | None, address: str | None, runs_dir: str | None, shared_runs: bool
) -> None:
    """``submit --detach``: record the study, submit it as a Ray Job, say how to follow it."""
    from transferlab.service.jobs import submit_detached

    study = submit_detached(vspec, db=db, address=address, runs=runs_dir, shared_runs=shared_runs or None)
    opts = (f" --db {db}" if db else "") + (f" --address {address}" if address else "")
    exp = study.experiment_id
    click.echo(
        f"experiment {exp} ({vspec.spec.name}, {study.trials} trials) recorded and submitted as Ray job "
        f"{study.job_id}\n"
        f"  cluster    {study.address}; dashboard {study.dashboard} (Jobs tab; token: `ray get-auth-token`)\n"
        f"  follow it  transferlab status {exp}{opts}\n"
        f"             transferlab logs {exp}{opts} --follow\n"
        f"  stop it    RAY_AUTH_MODE=token ray job stop {study.job_id} --address {study.dashboard}  "
        f"(then `transferlab resume {exp}{' --db ' + db if db else ''}` finishes it)"
    )
    if study.password_withheld:
        click.echo(
            "note: the job was given the database URL without its password (the dashboard shows a job's "
            "command); the cluster must supply it, e.g. in ~/.pgpass or PGPASSWORD where the head started",
            err=True,
        )
