"""Ray cluster and Ray Jobs: `cluster up|down|status`, `submit --detach`, job state in `status`, `logs`,
fast errors for unreachable clusters, and the refusal of multi-node runs the store cannot serve.

One Ray per test session: the slow tests use the session Ray of `ray_session` (its dashboard on, for the
Jobs API). `cluster up` and `cluster down` run against a fake `ray` command: `ray stop` would stop every
Ray process of the machine, the session Ray included.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import make_url

import transferlab
from tests.conftest import TINY_TRANSFER
from transferlab.cli.main import cli
from transferlab.service import driver, jobs
from transferlab.service.driver import DriverError, check_cluster, record_study, resume_study, run_study
from transferlab.service.spec import validate_spec_text
from transferlab.service.store import Store

CLI = str(Path(sys.executable).parent / "transferlab")
TWO_NODES = [
    {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0, "node:__internal_head__": 1}},
    {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4.0}},
]


def experiment_count(db: str) -> int:
    path = Path(db.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    return len(transferlab.query("SELECT id FROM experiments", db=db))


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_TRANSFER)
    return path


@pytest.fixture
def no_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend no Ray runs on this machine and no RAY_ADDRESS is set."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(jobs, "local_head", lambda: None)
    monkeypatch.setattr(jobs, "local_ray_addresses", lambda: set())


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake two-node cluster: Ray is never started, `ray.nodes()` lists two alive nodes."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: TWO_NODES)
    monkeypatch.setattr(driver, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(jobs, "ensure_ray", lambda address=None: None)
    monkeypatch.delenv(driver.SHARED_RUNS_ENV, raising=False)


# -- reaching a cluster: fast errors, never a hang --------------------------------------------------------


def serve_once(reply: bytes) -> int:
    """A one-connection TCP server on 127.0.0.1 that answers ``reply``; returns its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.recv(64)
            conn.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    return server.getsockname()[1]


def test_split_ray_address() -> None:
    assert jobs.split_ray_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert jobs.split_ray_address("head") == ("head", 6379)
    assert jobs.split_ray_address("ray://head") == ("head", 10001)
    assert jobs.split_ray_address("ray://head:10002") == ("head", 10002)
    assert jobs.split_ray_address("[::1]:6380") == ("::1", 6380)
    with pytest.raises(DriverError, match="not a cluster address"):
        jobs.split_ray_address("http://127.0.0.1:8265")
    with pytest.raises(DriverError, match="not a number"):
        jobs.split_ray_address("head:port")


def test_probe_tells_a_closed_port_a_non_ray_server_and_a_grpc_server_apart() -> None:
    start = time.monotonic()
    with pytest.raises(DriverError, match=r"could not reach the Ray cluster at 127\.0\.0\.1:1: .*refused"):
        jobs.probe_ray_address("127.0.0.1:1")
    http = serve_once(b"HTTP/1.0 400 Bad Request\r\n\r\n")  # what the dashboard's port answers
    with pytest.raises(DriverError, match="not a Ray cluster"):
        jobs.probe_ray_address(f"127.0.0.1:{http}")
    grpc = serve_once(bytes([0, 0, 0x18, 4, 0, 0, 0, 0, 0]))  # an HTTP/2 SETTINGS frame, as Ray's GCS sends
    jobs.probe_ray_address(f"127.0.0.1:{grpc}")
    assert time.monotonic() - start < 10


def test_submit_to_an_unreachable_address_fails_fast_and_writes_nothing(
    spec_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    # Even when this test process holds the session Ray, the address must be probed, not ignored.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    for detach in ([], ["--detach"]):
        start = time.monotonic()
        result = CliRunner().invoke(
            cli, ["submit", str(spec_file), "--db", db, "--address", "127.0.0.1:1", *detach]
        )
        assert time.monotonic() - start < 30
        assert result.exit_code == 1, result.output
        assert "Error: could not reach the Ray cluster at 127.0.0.1:1" in result.output
        assert experiment_count(db) == 0


# -- multi-node runs the store or the runs dir cannot serve ----------------------------------------------


def test_a_multi_node_run_with_a_sqlite_store_is_refused_before_anything_is_written(
    two_nodes: None, spec_file: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'store.db'}"
    result = CliRunner().invoke(cli, ["submit", str(spec_file), "--db", db, "--address", "10.0.0.1:6379"])
    assert result.exit_code == 1
    assert "this Ray cluster has 2 nodes but the store is a SQLite file" in result.output
    assert "must be PostgreSQL" in result.output
    assert experiment_count(db) == 0
    with pytest.raises(DriverError, match="must be PostgreSQL"):  # and through --detach, before any job
        jobs.submit_detached(validate_spec_text(TINY_TRANSFER), db=db, address="10.0.0.1:6379")
    assert experiment_count(db) == 0


def test_resume_on_a_multi_node_cluster_is_refused_with_a_sqlite_store(
    two_nodes: None, tmp_path: Path
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        exp_id = record_study(validate_spec_text(TINY_TRANSFER), store, tmp_path / "runs")
        with pytest.raises(DriverError, match="must be PostgreSQL"):
            resume_study(exp_id, store, address="10.0.0.1:6379")
        assert {t.status for t in store.trials(exp_id)} == {"pending"}
    finally:
        store.close()


def test_a_multi_node_run_needs_a_shared_runs_dir(two_nodes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres = make_url("postgresql+psycopg://user:secret@db.example/transferlab")
    with pytest.raises(DriverError, match="--shared-runs-dir") as refused:
        check_cluster(postgres, Path("/scratch/runs"))
    assert "/scratch/runs" in str(refused.value) and "secret" not in str(refused.value)
    check_cluster(postgres, Path("/shared/runs"), shared_runs=True)
    monkeypatch.setenv(driver.SHARED_RUNS_ENV, "1")
    check_cluster(postgres, Path("/shared/runs"))


def test_a_single_node_takes_a_sqlite_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: TWO_NODES[:1] + [{**TWO_NODES[1], "Alive": False}])
    check_cluster(make_url("sqlite:///x.db"), Path("runs"))


def test_run_study_checks_the_cluster_before_recording(two_nodes: None, tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        with pytest.raises(DriverError, match="SQLite"):
            run_study(validate_spec_text(TINY_TRANSFER), store, address="10.0.0.1:6379", runs=tmp_path)
        assert store.experiments() == []
    finally:
        store.close()


# -- detached studies without a cluster ------------------------------------------------------------------


def test_record_study_records_every_planned_trial_as_pending(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        exp_id = record_study(validate_spec_text(TINY_TRANSFER), store, tmp_path / "runs")
        info = store.find_experiment(exp_id)
        assert info.status == "pending" and info.storage_path == str((tmp_path / "runs").resolve())
        trials = store.trials(exp_id)
        assert len(trials) == 12 and {t.status for t in trials} == {"pending"}
        assert all(t.config["checkpoint_path"].startswith(str(tmp_path / "runs")) for t in trials)
    finally:
        store.close()


def test_job_store_url_is_absolute_and_never_carries_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert jobs.job_store_url("results.db") == (f"sqlite:///{tmp_path / 'results.db'}", False)
    url, withheld = jobs.job_store_url("postgresql://me:secret@db.example:5432/lab")
    assert withheld and "secret" not in url and url.endswith("me@db.example:5432/lab")
    with pytest.raises(DriverError, match="in-memory"):
        jobs.job_store_url("sqlite://")


def test_job_entrypoint_resumes_the_experiment_on_the_given_cluster() -> None:
    command = jobs.job_entrypoint(7, "sqlite:////data/my store.db", "10.0.0.1:6379", "10.0.0.1:6379", True)
    assert command.endswith(
        "resume 7 --db 'sqlite:////data/my store.db' --address 10.0.0.1:6379 --shared-runs-dir"
    )
    assert command.startswith(str(Path(sys.executable).with_name("transferlab")))
    assert jobs.job_entrypoint(7, "x", None, "ray://head:10001", None).startswith("transferlab resume 7")


def test_detach_without_a_cluster_says_how_to_get_one(
    no_local_ray: None, spec_file: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'store.db'}"
    result = CliRunner().invoke(cli, ["submit", str(spec_file), "--db", db, "--detach"])
    assert result.exit_code == 1
    assert (
        "--detach needs a running Ray cluster" in result.output and "transferlab cluster up" in result.output
    )
    assert experiment_count(db) == 0
    result = CliRunner().invoke(cli, ["submit", str(spec_file), "--detach", "--plot", "x.png"])
    assert result.exit_code == 2 and "--plot needs the finished study" in result.output


def test_status_without_a_cluster_shows_the_store_alone(no_local_ray: None, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store.open(db)
    exp_id = record_study(validate_spec_text(TINY_TRANSFER), store, tmp_path / "runs")
    store.close()
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["status", "--db", db, "-O", "csv"])
    assert result.exit_code == 0 and result.output.splitlines()[0] == "id,name,study,status,trials,created"
    result = CliRunner().invoke(cli, ["status", str(exp_id), "--db", db, "--address", "127.0.0.1:1"])
    assert result.exit_code == 0 and "pending" in result.output
    assert "note: no Ray job states: could not reach the Ray cluster at 127.0.0.1:1" in result.output
    assert time.monotonic() - start < 30
    result = CliRunner().invoke(cli, ["logs", str(exp_id), "--db", db])
    assert result.exit_code == 1 and "no Ray cluster to ask" in result.output


# -- cluster up / down against a fake `ray` command ----------------------------------------------------------


class FakeRay:
    """Records `ray ...` invocations; `get-auth-token` prints a token that must never be shown."""

    def __init__(self, start_status: int = 0) -> None:
        self.calls: list[tuple[list[str], dict[str, str] | None]] = []
        self.start_status = start_status

    def __call__(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        self.calls.append((args, env))
        if args[0] == "get-auth-token":
            return subprocess.CompletedProcess(args, 0, "SECRET-TOKEN-123", "")
        status = self.start_status if args[0] == "start" else 0
        return subprocess.CompletedProcess(args, status, "", "boom: port in use" if status else "")


def test_cluster_up_starts_a_token_protected_head_with_a_local_dashboard(
    no_local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay()
    monkeypatch.setattr(jobs, "run_ray", fake)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # cluster up keeps token authentication on anyway
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    args = [
        "cluster",
        "up",
        "--port",
        "6400",
        "--dashboard-port",
        "8300",
        "--num-cpus",
        "3",
        "--num-gpus",
        "1",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (token_args, token_env), (start_args, start_env) = fake.calls
    assert token_args == ["get-auth-token", "--generate"]
    assert start_args[:2] == ["start", "--head"]
    assert {
        "--port=6400",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8300",
        "--num-cpus=3",
        "--num-gpus=1",
    } <= set(start_args)
    for env in (token_env, start_env):
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_ADDRESS" not in env
    assert "127.0.0.1:6400" in result.output and "http://127.0.0.1:8300" in result.output
    assert "ray get-auth-token" in result.output and "SECRET-TOKEN" not in result.output


def test_cluster_up_refuses_a_second_head_and_reports_ray_start_errors(
    no_local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay()
    monkeypatch.setattr(jobs, "run_ray", fake)
    monkeypatch.setattr(jobs, "local_head", lambda: "10.0.0.1:6379")
    result = CliRunner().invoke(cli, ["cluster", "up"])
    assert result.exit_code == 1 and "already running on this machine at 10.0.0.1:6379" in result.output
    monkeypatch.setattr(jobs, "local_head", lambda: None)
    monkeypatch.setattr(jobs, "local_ray_addresses", lambda: {"10.0.0.1:6379"})
    result = CliRunner().invoke(cli, ["cluster", "up"])
    assert result.exit_code == 1 and "already listens on port 6379" in result.output
    assert fake.calls == []
    monkeypatch.setattr(jobs, "local_ray_addresses", lambda: set())
    monkeypatch.setattr(jobs, "run_ray", FakeRay(start_status=1))
    result = CliRunner().invoke(cli, ["cluster", "up"])
    assert result.exit_code == 1 and "`ray start --head` failed" in result.output and "boom" in result.output
    assert CliRunner().invoke(cli, ["cluster", "up", "--num-cpus", "-1"]).exit_code == 2
    result = CliRunner().invoke(cli, ["cluster", "up", "--port", "70000"])
    assert result.exit_code == 1 and "1..65535" in result.output


def test_cluster_down_runs_ray_stop_only_when_ray_runs(
    no_local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay()
    monkeypatch.setattr(jobs, "run_ray", fake)
    result = CliRunner().invoke(cli, ["cluster", "down"])
    assert result.exit_code == 1 and "no Ray is running on this machine" in result.output
    assert fake.calls == []
    monkeypatch.setattr(jobs, "local_ray_addresses", lambda: {"10.0.0.1:6379"})
    result = CliRunner().invoke(cli, ["cluster", "down", "--force"])
    assert result.exit_code == 0 and "10.0.0.1:6379" in result.output
    assert [args for args, _ in fake.calls] == [["stop", "--force"]]


def test_cluster_status_without_a_head_says_how_to_start_one(no_local_ray: None) -> None:
    result = CliRunner().invoke(cli, ["cluster", "status"])
    assert result.exit_code == 1 and "no Ray head is running" in result.output
    assert "transferlab cluster up" in result.output


# -- against the session Ray (slow) ----------------------------------------------------------------------


def wait_for_job(address: str, db: str, exp_id: int, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.experiment_jobs(db, address).latest(exp_id)
        if job is not None and job.status.is_terminal():
            return job
        time.sleep(2)
    raise AssertionError(f"the job of experiment {exp_id} did not finish within {timeout} s")


@pytest.mark.slow
def test_a_detached_study_runs_as_a_ray_job(ray_session, spec_file: Path, tmp_path: Path) -> None:
    address = ray_session.get_runtime_context().gcs_address
    db = f"sqlite:///{tmp_path / 'store.db'}"
    submitted = subprocess.run(
        [
            CLI,
            "submit",
            str(spec_file),
            "--detach",
            "--db",
            db,
            "--address",
            address,
            "--runs-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = re.search(
        r"experiment (\d+) \(tiny, 12 trials\) recorded and submitted as Ray job (\S+)", submitted.stdout
    )
    assert found, submitted.stdout
    exp_id, job_id = int(found[1]), found[2]
    assert (
        f"transferlab status {exp_id}" in submitted.stdout
        and f"transferlab logs {exp_id}" in submitted.stdout
    )

    job = wait_for_job(address, db, exp_id, timeout=400)
    assert job.submission_id == job_id
    assert job.metadata["transferlab_experiment"] == str(exp_id)
    assert job.status == "SUCCEEDED", job.message
    store = Store.open(db, create=False)
    try:
        assert store.find_experiment(exp_id).status == "completed"
        assert {t.status for t in store.trials(exp_id)} == {"completed"} and len(store.trials(exp_id)) == 12
    finally:
        store.close()

    status = CliRunner().invoke(cli, ["status", str(exp_id), "--db", db, "--address", address])
    assert status.exit_code == 0 and f"Ray job: SUCCEEDED (job {job_id})" in status.output
    listing = CliRunner().invoke(cli, ["status", "--db", db, "--address", address, "-O", "json"])
    assert '"job": "SUCCEEDED"' in listing.output
    logs = CliRunner().invoke(cli, ["logs", str(exp_id), "--db", db, "--address", address])
    assert logs.exit_code == 0
    assert f"resume {exp_id} --db {db}" in logs.output  # the entrypoint, as Ray logs it
    assert f"experiment {exp_id}: 12 trials to run" in logs.output and "test accuracy" in logs.output
    followed = CliRunner().invoke(cli, ["logs", str(exp_id), "--db", db, "--address", address, "--follow"])
    assert followed.exit_code == 0 and f"experiment {exp_id}: 12 trials to run" in followed.output


@pytest.mark.slow
def test_logs_of_an_experiment_that_was_not_a_job(ray_session, tmp_path: Path) -> None:
    address = ray_session.get_runtime_context().gcs_address
    db = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store.open(db)
    exp_id = record_study(validate_spec_text(TINY_TRANSFER), store, tmp_path / "runs")
    store.close()
    result = CliRunner().invoke(cli, ["logs", str(exp_id), "--db", db, "--address", address])
    assert result.exit_code == 1 and "was not run as a Ray job" in result.output
    result = CliRunner().invoke(cli, ["status", str(exp_id), "--db", db, "--address", address])
    assert result.exit_code == 0 and "Ray job" not in result.output


@pytest.mark.slow
def test_cluster_status_shows_the_session_ray(ray_session) -> None:
    address = ray_session.get_runtime_context().gcs_address
    result = CliRunner().invoke(cli, ["cluster", "status", "--address", address])
    assert result.exit_code == 0, result.output
    assert f"Ray cluster at {address}: 1 of 1 nodes alive" in result.output
    assert "dashboard: http://127.0.0.1:" in result.output and "token authentication: token" in result.output
    assert "free now: CPU" in result.output and "of 2, GPU" in result.output


@pytest.mark.slow
def test_an_unreachable_address_fails_within_30_seconds_end_to_end(
    ray_session, spec_file: Path, tmp_path: Path
):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    for detach in ([], ["--detach"]):
        start = time.monotonic()
        done = subprocess.run(
            [CLI, "submit", str(spec_file), "--db", db, "--address", "127.0.0.1:1", *detach],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - start < 30
        assert done.returncode == 1
        assert "Error: could not reach the Ray cluster at 127.0.0.1:1" in done.stderr
        assert experiment_count(db) == 0
    session = jobs.experiment_jobs(db, ray_session.get_runtime_context().gcs_address)
    assert session.by_experiment == {}  # and no Ray job names this store
