"""End to end: tiny transfer studies through Ray Tune into SQLite, then the CLI on the store."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import transferlab
from tests.conftest import TINY_TRANSFER
from transferlab.cli.main import cli
from transferlab.engine.checkpoint import load_state
from transferlab.service.driver import StudyInterrupted
from transferlab.service.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the 12-trial tiny study once for this module."""
    root = tmp_path_factory.mktemp("study")
    spec = root / "tiny.yaml"
    spec.write_text(TINY_TRANSFER)
    db = f"sqlite:///{root / 'store.db'}"
    events: list[tuple[str, str]] = []
    exp_id = transferlab.submit(
        spec,
        db=db,
        runs_dir=root / "runs",
        on_event=lambda kind, trial, data: events.append((kind, trial.key)),
    )
    return {"db": db, "exp": exp_id, "root": root, "events": events}


def open_store(study: dict) -> Store:
    return Store.open(study["db"], create=False)


def test_every_planned_trial_completes(study: dict) -> None:
    store = open_store(study)
    info = store.find_experiment(study["exp"])
    trials = store.trials(info.id)
    assert info.status == "completed" and info.name == "tiny"
    assert len(trials) == 12  # baseA, baseB + 2 depths x 5 conditions
    assert {t.status for t in trials} == {"completed"}
    assert sorted((t.condition, t.depth) for t in trials if t.role == "base") == [("baseA", 0), ("baseB", 0)]
    completed = [key for kind, key in study["events"] if kind == "completed"]
    assert sorted(completed) == sorted(t.key for t in trials)  # progress saw every trial finish
    for t in trials:
        assert t.bn_policy == "frozen" and t.started_at and t.finished_at and t.checkpoint_path
        assert t.provenance["code_version"] and t.provenance["libraries"]["torch"]
        assert len(t.provenance["data_hash"]) == 16 and t.data_hash == t.provenance["data_hash"]
    store.close()


def test_transfer_trials_keep_their_base_stages_frozen(study: dict) -> None:
    store = open_store(study)
    trials = store.trials(study["exp"])
    by_id = {t.id: t for t in trials}
    for t in trials:
        if t.condition in ("baseA", "baseB", "random"):
            assert t.base_trial_id is None
            continue
        base = by_id[t.base_trial_id]
        assert base.condition == ("baseA" if t.condition.startswith("A") else "baseB")
        mine, theirs = load_state(t.checkpoint_path), load_state(base.checkpoint_path)
        copied = [k for k in theirs if k.startswith(tuple(f"backbone.stages.{i}." for i in range(t.depth)))]
        assert copied
        if t.condition in ("AnB", "BnB"):  # frozen: parameters and BatchNorm buffers bit-identical
            assert all(__import__("torch").equal(mine[k], theirs[k]) for k in copied), t.key
        else:  # fine-tuned: the copied stages moved on
            assert any(not __import__("torch").equal(mine[k], theirs[k]) for k in copied), t.key
    store.close()


def test_metrics_have_one_row_per_key(study: dict) -> None:
    frame = transferlab.metrics(study["exp"], db=study["db"])
    keys = ["trial_id", "epoch", "split", "name"]
    assert not frame.duplicated(keys).any()
    per_trial = frame.groupby("trial_id")
    assert per_trial.ngroups == 12
    for _, rows in per_trial:
        assert set(rows[rows.split == "val"].epoch) == {1, 2}
        assert set(rows[rows.split == "test"].name) == {"loss", "accuracy"}
    dupes = transferlab.query(
        "SELECT trial_id, epoch, split, name, COUNT(*) AS n FROM metrics "
        "GROUP BY trial_id, epoch, split, name HAVING COUNT(*) > 1",
        db=study["db"],
    )
    assert dupes.empty


def test_results_table_and_formats(study: dict) -> None:
    frame = transferlab.results(study["exp"], db=study["db"])
    assert len(frame) == 12 and frame["value"].between(0, 1).all()
    runner = CliRunner()
    out = runner.invoke(cli, ["results", str(study["exp"]), "--db", study["db"], "--output", "json"])
    assert out.exit_code == 0, out.output
    records = json.loads(out.output)
    assert {(r["depth"], r["condition"]) for r in records if r["depth"]} == {
        (d, c) for d in (1, 3) for c in ("AnB", "AnB+", "BnB", "BnB+", "random")
    }
    table = runner.invoke(cli, ["results", "tiny", "--db", study["db"]])
    assert table.exit_code == 0 and "AnB+" in table.output and "12 trials with test accuracy" in table.output


def test_plot_status_and_read_only_query(study: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    png = tmp_path / "fig.png"
    out = runner.invoke(cli, ["plot", "tiny", "-o", str(png), "--db", study["db"]])
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = runner.invoke(cli, ["status", "--db", study["db"], "--output", "json"])
    assert json.loads(out.output)[0]["status"] == "completed"
    out = runner.invoke(cli, ["status", "tiny", "--db", study["db"], "--output", "csv"])
    assert out.exit_code == 0 and out.output.count("completed") == 12
    out = runner.invoke(cli, ["query", "DELETE FROM trials", "--db", study["db"]])
    assert out.exit_code != 0 and "read-only" in out.output
    count = transferlab.query("SELECT COUNT(*) AS n FROM trials", db=study["db"])
    assert int(count["n"][0]) == 12


FAILING = TINY_TRANSFER.replace("name: tiny", "name: failing").replace(
    "task: {name: digits, image_size: 16}", "task: {name: nan_digits, image_size: 16}"
)


def test_a_failed_base_net_skips_its_transfer_trials(ray_session, workdir: Path) -> None:
    spec = workdir / "failing.yaml"
    spec.write_text(FAILING)
    result = CliRunner().invoke(cli, ["submit", str(spec)])
    store = Store.open(f"sqlite:///{workdir / 'transferlab.db'}", create=False)
    info = store.find_experiment("failing")
    trials = {t.key: t for t in store.trials(info.id)}
    base_a = trials["given/s0/baseA/d0"]
    assert base_a.status == "failed" and "non-finite loss nan at epoch 1, step 1" in base_a.error
    for key, t in trials.items():
        if t.condition in ("AnB", "AnB+"):
            assert t.status == "skipped" and "given/s0/baseA/d0" in t.error, key
        elif t.condition != "baseA":
            assert t.status == "completed", (key, t.error)
    assert info.status == "failed"
    # The run finished and shows the table of what completed, then exits non-zero saying why.
    assert result.exit_code == 1, result.output
    assert "experiment 1 finished with 1 failed, 4 skipped trials" in result.output
    assert "7 trials with test accuracy; left out: 1 failed, 4 skipped" in " ".join(result.output.split())
    assert (workdir / "transferlab-runs").is_dir()
    store.close()


def test_ctrl_c_cancels_unfinished_trials_and_never_completes_them(ray_session, tmp_path: Path) -> None:
    spec = tmp_path / "interrupted.yaml"
    spec.write_text(TINY_TRANSFER.replace("name: tiny", "name: interrupted"))
    db = f"sqlite:///{tmp_path / 'store.db'}"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_first(kind: str, trial, data) -> None:
        if kind == "completed":
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal sends

    with pytest.raises(StudyInterrupted, match="interrupted: .* unfinished trials were marked cancelled"):
        transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs", on_event=ctrl_c_after_first)
    assert signal.getsignal(signal.SIGINT) is before  # Tune's handler does not outlive the study
    store = Store.open(db, create=False)
    info = store.find_experiment("interrupted")
    trials = store.trials(info.id)
    statuses = [t.status for t in trials]
    assert info.status == "cancelled"
    assert "running" not in statuses and "pending" not in statuses
    assert statuses.count("completed") >= 1 and statuses.count("cancelled") >= 5
    for t in trials:
        if t.status == "cancelled":
            assert "stopped before this trial finished" in t.error and t.checkpoint_path is None
        else:
            assert t.status == "completed" and Path(t.checkpoint_path).is_file()
    store.close()
