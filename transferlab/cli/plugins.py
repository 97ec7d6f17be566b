"""``plugins list``: what backbones, heads and tasks are installed, and from which package."""

from __future__ import annotations

import json

import click

from transferlab.cli.options import console

KINDS = ("backbone", "head", "task")


@click.group()
def plugins() -> None:
    """Installed plugins (built-in and from other packages' entry points)."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only this kind.")
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_plugins(kind: str | None, output: str) -> None:
    """Name, kind, source package and description of every plugin; failed imports are listed too."""
    from transferlab.registry import REGISTRIES

    kinds = [kind] if kind else list(KINDS)
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
