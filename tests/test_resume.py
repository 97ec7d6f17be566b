"""A driver killed with SIGKILL mid-study, then `resume`: nothing lost, nothing run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import transferlab
from tests.conftest import TINY_TRANSFER
from transferlab.service.store import Store

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "transferlab")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def completed_keys(db: str) -> set[str]:
    if not Path(db.removeprefix("sqlite:///")).exists():
        return set()
    try:
        frame = transferlab.query("SELECT key FROM trials WHERE status = 'completed'", db=db)
    except Exception:  # the schema may not exist yet while the driver starts
        return set()
    return set(frame["key"])


def test_resume_after_sigkill_finishes_the_plan_without_rerunning_completed_trials(
    ray_session, tmp_path: Path
) -> None:
    spec = tmp_path / "killed.yaml"
    spec.write_text(TINY_TRANSFER.replace("name: tiny", "name: killed").replace("epochs: 2", "epochs: 3"))
    db = f"sqlite:///{tmp_path / 'store.db'}"
    address = ray_session.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [CLI, "submit", str(spec), "--db", db, "--address", address, "--runs-dir", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: len(completed_keys(db)) >= 2 or driver.poll() is not None, 240, "two completed trials"
        )
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)  # no cleanup of any kind
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()

    store = Store.open(db, create=False)
    info = store.find_experiment("killed")
    before = {t.key: t for t in store.trials(info.id)}
    assert info.status == "running" and len(before) == 12
    done_before = {k: t for k, t in before.items() if t.status == "completed"}
    assert 2 <= len(done_before) < 12
    stamps = {k: (t.finished_at, Path(t.checkpoint_path).stat().st_mtime_ns) for k, t in done_before.items()}
    store.close()

    started: list[str] = []
    assert (
        transferlab.resume(
            info.id, db=db, on_event=lambda kind, t, d: kind == "start" and started.append(t.key)
        )
        == info.id
    )

    store = Store.open(db, create=False)
    after = {t.key: t for t in store.trials(info.id)}
    assert set(after) == set(before)  # the set of trials equals the plan
    assert {t.status for t in after.values()} == {"completed"}
    assert store.find_experiment(info.id).status == "completed"
    assert not set(started) & set(done_before)  # no completed trial ran again
    for key, (finished, mtime) in stamps.items():
        assert after[key].finished_at == finished
        assert Path(after[key].checkpoint_path).stat().st_mtime_ns == mtime
    metrics = transferlab.metrics(info.id, db=db)
    assert not metrics.duplicated(["trial_id", "epoch", "split", "name"]).any()
    for _, rows in metrics.groupby("trial_id"):
        assert set(rows[rows.split == "val"].epoch) == {1, 2, 3}  # every epoch exactly once
    store.close()


def start_driver(spec: Path, db: str, address: str, runs: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, "submit", str(spec), "--db", db, "--address", address, "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_sigterm_cancels_unfinished_trials_and_resume_finishes_them(ray_session, tmp_path: Path) -> None:
    spec = tmp_path / "termed.yaml"
    spec.write_text(TINY_TRANSFER.replace("name: tiny", "name: termed").replace("epochs: 2", "epochs: 3"))
    db = f"sqlite:///{tmp_path / 'store.db'}"
    driver = start_driver(spec, db, ray_session.get_runtime_context().gcs_address, tmp_path / "runs")
    try:
        wait_for(lambda: len(completed_keys(db)) >= 1 or driver.poll() is not None, 240, "a completed trial")
        driver.send_signal(signal.SIGTERM)
        output = driver.communicate(timeout=120)[0].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-2000:]
    assert "unfinished trials were marked cancelled" in output and "transferlab resume" in output
    store = Store.open(db, create=False)
    info = store.find_experiment("termed")
    statuses = [t.status for t in store.trials(info.id)]
    assert info.status == "cancelled" and "running" not in statuses and "pending" not in statuses
    assert "cancelled" in statuses and "completed" in statuses
    store.close()
    assert transferlab.resume("termed", db=db) == info.id
    store = Store.open(db, create=False)
    assert {t.status for t in store.trials(info.id)} == {"completed"}
    store.close()


def test_two_studies_into_one_sqlite_file_at_once_both_complete(ray_session, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    address = ray_session.get_runtime_context().gcs_address
    drivers = []
    for name in ("first", "second"):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(TINY_TRANSFER.replace("name: tiny", f"name: {name}"))
        drivers.append(start_driver(spec, db, address, tmp_path / "runs"))
    outputs = [d.communicate(timeout=600)[0].decode() for d in drivers]
    for driver, output in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, output[-3000:]
        assert "locked" not in output
    frame = transferlab.query(
        "SELECT e.name, t.status, COUNT(*) AS n FROM trials t JOIN experiments e ON e.id = t.experiment_id "
        "GROUP BY e.name, t.status",
        db=db,
    )
    assert sorted(zip(frame["name"], frame["status"], frame["n"], strict=True)) == [
        ("first", "completed", 12),
        ("second", "completed", 12),
    ]
    metrics = transferlab.query("SELECT COUNT(*) AS n FROM metrics", db=db)
    assert int(metrics["n"][0]) == 24 * (2 * 5 + 2)  # per trial: 2 epochs x (4 metrics + lr) + 2 test rows
