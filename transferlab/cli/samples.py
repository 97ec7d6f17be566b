"""``samples``: what a trained trial predicts, as text (captions) or a PNG grid (reconstructions)."""

from __future__ import annotations

import click

from transferlab.cli.options import console, db_option


@click.command()
@click.argument("experiment")
@click.argument("trial", required=False)
@db_option
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="test",
    show_default=True,
    help="Which data split to draw the samples from.",
)
@click.option(
    "-n", "count", type=click.IntRange(1, 256), default=8, show_default=True, help="How many samples."
)
@click.option(
    "--beam-size",
    type=click.IntRange(1, 64),
    default=3,
    show_default=True,
    help="Beam width for the beam-search captions (caption targets).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="PNG to write for image targets [default: EXPERIMENT-TRIALID-samples.png].",
)
def samples(
    experiment: str,
    trial: str | None,
    db: str | None,
    split: str,
    count: int,
    beam_size: int,
    out: str | None,
) -> None:
    """Show what TRIAL of EXPERIMENT predicts for the first samples of a split.

    \b
    caption targets: the reference, greedy and beam-search captions, one block per image
    image targets:   a PNG of inputs, reconstructions and (VAE) samples from the prior

    TRIAL is a trial id or key (`transferlab status EXPERIMENT` lists them); by default the completed
    trial with the best test value of the experiment's primary metric.
    """
    from transferlab.service.api import samples as trial_samples

    try:
        shown = trial_samples(experiment, trial, db=db, split=split, n=count, out=out, beam_size=beam_size)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    chosen = shown["trial"]
    out_console = console()
    out_console.print(f"trial [bold]{chosen.id}[/] ({chosen.key}), {split} split")
    if "figure" in shown:
        out_console.print(f"wrote {shown['figure']}")
        return
    for i, row in enumerate(shown["captions"]):
        out_console.print(f"[bold]{i}[/] reference: {row['reference']}", highlight=False)
        out_console.print(f"  greedy:    {row['greedy']}", highlight=False)
        out_console.print(f"  beam ({beam_size}):  {row['beam']}", highlight=False)
