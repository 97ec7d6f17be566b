"""``plugins list`` and ``plugins check``: what is installed, from which package, and whether it works."""

from __future__ import annotations

import json

import click

from transferlab.cli.options import console, parse_options

KINDS = ("backbone", "head", "task")
#: ``plugins list`` shows every registry; ``plugins check`` has contract checks for KINDS only.
LIST_KINDS = (*KINDS, "weighting")


@click.group()
def plugins() -> None:
    """Installed plugins (built-in and from other packages' entry points)."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(LIST_KINDS), default=None, help="Only this kind.")
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_plugins(kind: str | None, output: str) -> None:
    """Name, kind, source package and description of every plugin; failed imports are listed too."""
    from transferlab.registry import REGISTRIES

    kinds = [kind] if kind else list(LIST_KINDS)
    rows, failures = [], []
    for k in kinds:
        registry = REGISTRIES[k]
        rows += [
            {"name": e.name, "kind": e.kind, "source": e.source, "description": e.description}
            for e in registry.entries()
        ]
        failures += [
            {"name": f.name, "kind": f.kind, "source": f.source, "target": f.target, "error": f.error}
            for f in registry.failures()
        ]
    if output == "json":
        click.echo(json.dumps({"plugins": rows, "failed": failures}, indent=2))
        return
    from rich.table import Table

    table = Table(title="plugins")
    for col in ("name", "kind", "source", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["source"], r["description"])
    out = console()
    out.print(table)
    out.print("any timm model is a backbone too: name it `timm/MODEL` (e.g. timm/resnet18)")
    for f in failures:
        out.print(
            f"[red]failed to load[/] {f['kind']} '{f['name']}' from {f['source']} "
            f"({f['target']}): {f['error']}"
        )


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``: channels, then one or more spatial sizes."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise click.BadParameter(f"expected CxHxW with positive integers, such as 3x32x32; got {text!r}")
    return shape


@plugins.command("check")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Needed when NAME is several kinds.")
@click.option(
    "--input",
    "input_shape",
    default=None,
    metavar="CxHxW",
    help="Input the backbone is built for and run on  [default: 3x32x32].",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    metavar="TASK",
    help="Check a head with this task (repeatable)  [default: every registered task of a kind it declares].",
)
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A factory option, the value read as YAML (e.g. -o 'widths=[8, 16]'); repeatable.",
)
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def check(
    name: str,
    kind: str | None,
    input_shape: str | None,
    tasks: tuple[str, ...],
    options: tuple[str, ...],
    output: str,
) -> None:
    """Build plugin NAME on a tiny input and verify its contract; exit status 1 if any check fails.

    Backbones: stages vs feature_info, feature shapes, every freeze depth (frozen stages bit-identical
    after training). Heads: built for each compatible task, output shape, the task's loss and metrics.
    Tasks: target, splits, batches, loss, metrics, fingerprint, class subsets. `timm/MODEL` works too.
    """
    from transferlab.engine.contract import check_plugin

    shape = parse_input_shape(input_shape) if input_shape else None
    try:
        report = check_plugin(
            name, kind, input_shape=shape, options=parse_options(options), tasks=list(tasks) or None
        )
    except ValueError as exc:  # a name of several kinds, or an option meant for another kind
        raise click.UsageError(str(exc)) from None
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.kind} '{report.name}' from {report.source}")
        for result in report.checks:
            mark = click.style("PASS", fg="green") if result.ok else click.style("FAIL", fg="red", bold=True)
            click.echo(f"  {mark}  {result.name}: {result.detail}")
    failed = report.failed
    if failed:
        raise click.ClickException(
            f"{report.kind} '{report.name}' failed {len(failed)} of {len(report.checks)} checks: "
            + ", ".join(c.name for c in failed)
        )
    if output != "json":
        click.echo(f"all {len(report.checks)} checks passed")
