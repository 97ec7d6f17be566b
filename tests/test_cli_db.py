"""``transferlab db upgrade`` creates or migrates a store."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from transferlab.cli.main import cli
from transferlab.service.store import Store


def test_db_upgrade_creates_the_schema_and_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for _ in range(2):
        out = CliRunner().invoke(cli, ["db", "upgrade", "--db", url])
        assert out.exit_code == 0, out.output
        assert "schema revision 0001_initial" in out.output
    store = Store.open(url, create=False)
    assert store.experiments() == []
    store.close()


def test_db_upgrade_reports_a_missing_folder(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["db", "upgrade", "--db", f"sqlite:///{tmp_path / 'nope' / 'x.db'}"])
    assert out.exit_code == 1 and "folder" in out.output and "does not exist" in out.output
