"""The root ``transferlab`` group. Expected errors become ``click.ClickException`` here, in one place."""

from __future__ import annotations

from typing import Any

import click

from transferlab import __version__


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Error types that mean "bad input or environment", shown as one clean message."""
    from transferlab.registry import RegistryError, UnknownPluginError
    from transferlab.service.spec_yaml import SpecError

    errors: list[type[BaseException]] = [SpecError, UnknownPluginError, RegistryError, FileNotFoundError]
    try:
        from transferlab.service.store import StoreError

        errors.append(StoreError)
    except ImportError:  # pragma: no cover - the store is part of the package
        pass
    from transferlab.service.driver import DriverError
    from transferlab.service.report import ReportError

    errors += [DriverError, ReportError]
    return tuple(errors)


class TransferlabGroup(click.Group):
    """A group that turns transferlab's expected errors into ``error: ...`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            from transferlab.service.driver import StudyInterrupted

            if isinstance(exc, StudyInterrupted):  # like any program stopped by Ctrl-C: status 130
                click.echo(f"interrupted: {exc}", err=True)
                raise click.exceptions.Exit(130) from exc
            if isinstance(exc, _expected_errors()):
                raise click.ClickException(str(exc)) from exc
            raise


@click.group(cls=TransferlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="transferlab")
def cli() -> None:
    """Transfer and multitask learning studies with pluggable CNN backbones and heads.

    Write a YAML spec, `transferlab validate` it, `transferlab submit` it, then read the store
    with `status`, `results`, `plot` and `query`. `transferlab demo` runs a small study end to end.
    """


def _register() -> None:
    from transferlab.cli import cluster, db, experiments, inspect_cmd, plugins, reports, samples

    for command in (
        experiments.demo,
        experiments.validate,
        experiments.submit,
        experiments.resume,
        reports.status,
        reports.results,
        reports.plot,
        reports.query,
        reports.logs,
        samples.samples,
        cluster.cluster,
        plugins.plugins,
        db.db,
        inspect_cmd.inspect_command,
    ):
        cli.add_command(command)


_register()
