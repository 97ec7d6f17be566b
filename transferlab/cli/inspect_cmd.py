"""``inspect``: per-stage channels, stride, receptive field, parameters, MACs/FLOPs and activation memory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from transferlab.cli.options import console, parse_options


@click.command("inspect")
@click.argument("name")
@click.option(
    "--input",
    "input_shape",
    default="3x224x224",
    show_default=True,
    metavar="CxHxW",
    help="One input sample's shape; C also sets the backbone's in_channels.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A backbone option, the value read as YAML (e.g. --option widths=[8,16]); repeatable.",
)
@click.option("--output", "-O", type=click.Choice(["table", "json"]), default="table", show_default=True)
def inspect_command(name: str, input_shape: str, options: Sequence[str], output: str) -> None:
    """Complexity of backbone NAME per stage and in total, at batch 1.

    Columns: output shape, stride, receptive field (input pixels, from kernels, strides and dilations),
    parameters, multiply-accumulates (conv and matmul only; 1 MAC = 2 FLOPs) and activation memory
    (bytes of the stage's output for one float32 sample). When the backbone knows its published
    architecture, a "head (as published)" row and the published totals follow. See docs/inspect.md.
    """
    from transferlab.engine.complexity import InspectError, inspect_backbone

    try:
        report = inspect_backbone(name, input_shape, parse_options(options))
    except InspectError as exc:
        raise click.ClickException(str(exc)) from exc
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)


COLUMNS = {"stage": 0, "output": 0, "stride": 6, "RF": 5, "params": 7, "MACs": 7, "FLOPs": 7, "memory": 8}


def print_report(report: Any) -> None:
    """The report as a rich table: stages, the backbone's total, then the published head and total."""
    from rich import box
    from rich.table import Table

    shape = "x".join(map(str, report.input_shape))
    table = Table(
        title=f"{report.backbone} on a {shape} input (batch 1)",
        caption="RF: receptive field in input pixels; 1 MAC = 2 FLOPs (conv and matmul only); "
        "memory: the output of one float32 sample",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=0,
    )
    for col, width in COLUMNS.items():
        # Widths leave two spaces before each number and keep the table within 80 columns.
        table.add_column(col, justify="right" if width else "left", no_wrap=True, min_width=width)
    for i, part in enumerate(report.stages):
        table.add_row(*_part_cells(part), end_section=i == len(report.stages) - 1)
    table.add_row(*_total_cells("total (stages)", report.total), style="bold", end_section=True)
    if report.head is not None:
        table.add_row(*_part_cells(report.head))
    if report.published is not None:
        table.add_row(*_total_cells("total (as published)", report.published), style="bold")
    out = console()
    out.print(table)
    for note in report.notes:
        out.print(f"note: {note}")


def _part_cells(part: Any) -> list[str]:
    return [
        part.name,
        "x".join(map(str, part.output_shape)),
        "" if part.stride is None else str(part.stride),
        _receptive_field(part),
        si(part.params),
        si(part.macs),
        si(part.flops),
        si(part.activation_bytes, "B"),
    ]


def _total_cells(label: str, totals: Any) -> list[str]:
    memory = "" if totals.activation_bytes is None else si(totals.activation_bytes, "B")
    return [label, "", "", "", si(totals.params), si(totals.macs), si(totals.flops), memory]


def _receptive_field(part: Any) -> str:
    if part.receptive_field is None:
        return "global" if part.global_context else ("" if part.stride is None else "?")
    sizes = set(part.receptive_field)
    text = str(part.receptive_field[0]) if len(sizes) == 1 else "x".join(map(str, part.receptive_field))
    return f"{text}*" if part.global_context else text  # * explained in the report's notes


def si(value: float, unit: str = "") -> str:
    """A count with three significant digits and a decimal SI prefix: 25.6 M, 4.09 G, 3.21 MB."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale * 0.9995:  # 999,600 prints as 1.00 M, not 1e+03 k
            return f"{value / scale:#.3g}".rstrip(".") + f" {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()
