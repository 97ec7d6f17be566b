"""Options and output helpers shared by the commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

db_option = click.option(
    "--db",
    envvar="TRANSFERLAB_DB",
    default=None,
    metavar="URL",
    help="Store URL: sqlite:///path.db, a .db path, or postgresql://user@host/db "
    "[env TRANSFERLAB_DB; default ./transferlab.db].",
)
output_option = click.option(
    "--output",
    "-O",
    "output",
    type=click.Choice(["table", "csv", "json", "markdown"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def console() -> Any:
    from rich.console import Console

    return Console()


# rich lays out every cell of a table (seconds for thousands of rows); longer frames print as plain text.
RICH_TABLE_MAX_ROWS = 500


def print_frame(frame: Any, output: str, title: str | None = None) -> None:
    """Print a pandas DataFrame as a rich table (plain text when long), CSV, JSON records or Markdown."""
    if output == "table" and len(frame) > RICH_TABLE_MAX_ROWS:
        click.echo(f"{title}\n{frame.to_string(index=False)}" if title else frame.to_string(index=False))
    elif output == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    elif output == "json":
        click.echo(json.dumps(json.loads(frame.to_json(orient="records", date_format="iso")), indent=2))
    elif output == "markdown":
        click.echo(frame_markdown(frame))
    else:
        from rich.table import Table

        table = Table(title=title)
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*("" if v is None else str(v) for v in row))
        console().print(table)


def frame_markdown(frame: Any) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``("widths=[8, 16]", "blocks=2")`` -> ``{"widths": [8, 16], "blocks": 2}`` (values read as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(
                f"{pair!r}: the value is not YAML ({exc})", param_hint="--option"
            ) from None
    return options
