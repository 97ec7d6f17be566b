"""The Ray side of transferlab: reaching a cluster, a local head, and studies run as Ray Jobs.

A detached study (``submit --detach``) is recorded in the store first, every trial ``pending``, then
submitted as a Ray Job whose entrypoint is ``transferlab resume EXP``: the job's driver is an ordinary
resume, so a job that was stopped or died is finished the same way. The store has no column for the
job: jobs are found again by their metadata (``transferlab_experiment`` and ``transferlab_db``).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transferlab.service.driver import (
    DriverError,
    _dirname,
    check_cluster,
    check_resources,
    ensure_ray,
    record_study,
    runs_dir,
)
from transferlab.service.spec import ValidatedSpec

JOB_EXPERIMENT_KEY = "transferlab_experiment"
JOB_STORE_KEY = "transferlab_db"
JOB_NAME_KEY = "transferlab_name"
DEFAULT_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
LOOKUP_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 5.0
JOB_STOP_WAIT_S = 60
RAY_PROBE_TIMEOUT_S = 5.0
T = TypeVar("T")
# An HTTP/2 client preface and an empty SETTINGS frame: any gRPC server (Ray's GCS, the Ray Client
# server) answers with a SETTINGS frame, an HTTP/1 server (the dashboard) with text.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


# -- reaching a cluster -------------------------------------------------------------------------------


def ray_token_available() -> bool:
    """Whether Ray finds a token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).expanduser().is_file()


def use_ray_token() -> None:
    """Send Ray's token to the clusters this process connects to by address, when it has one.

    Ray protects a cluster with a token (by default for local clusters since 2.59) but a client that
    connects by address only sends it when RAY_AUTH_MODE=token; we set that when the variable is unset
    and a token exists. A cluster without token authentication ignores it; RAY_AUTH_MODE=disabled opts out.
    """
    if "RAY_AUTH_MODE" in os.environ or not ray_token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:  # Ray caches its config at import; refresh it as Ray itself does
        from ray._raylet import Config

        Config.initialize("")


def split_ray_address(address: str) -> tuple[str, int]:
    """(host, port) of a GCS address ``host[:port]`` or a Ray Client address ``ray://host[:port]``."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    elif scheme != "ray":
        raise DriverError(
            f"--address {address}: expected the cluster's GCS address host:port (e.g. 127.0.0.1:6379) or "
            "its Ray Client address ray://host:10001 (a dashboard http:// URL is not a cluster address)"
        )
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or "]" in port:  # no port, or an IPv6 address without one
        host, port = rest.rstrip("/"), ("10001" if scheme == "ray" else "6379")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise DriverError(f"--address {address}: the port {port!r} is not a number") from None


def probe_ray_address(address: str, timeout: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Fail fast when no Ray GCS (or Ray Client server) answers at ``address``.

    A TCP connect and an HTTP/2 handshake, ``timeout`` seconds each at most: Ray's own connect retries
    for minutes on a closed port or on a port where something else (the dashboard, say) listens.
    """
    if address in ("auto", "local"):
        return
    host, port = split_ray_address(address)
    where = f"the Ray cluster at {address}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS server waits for a TLS handshake, not for our plain preface
            sock.settimeout(timeout)
            sock.sendall(_HTTP2_PREFACE)
            reply = sock.recv(9)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DriverError(
            f"could not reach {where}: {reason} (no Ray head listens there; check the host and port, or "
            "start a local head with `transferlab cluster up`)"
        ) from None
    if len(reply) < 4 or reply[3] != _HTTP2_SETTINGS:
        raise DriverError(
            f"could not reach {where}: something listens on port {port} but it is not a Ray cluster; give "
            "the head's GCS address (port 6379 unless `ray start --port` chose another) or its Ray Client "
            "address ray://host:10001, not the dashboard's port"
        )


def token_location() -> str:
    """Where Ray reads its authentication token from, in words (the token itself is never shown)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    return str(Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"))


# -- the local head ---------------------------------------------------------------------------------


def ray_executable() -> str:
    """The ``ray`` command of this Python environment (else the one on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise DriverError("the `ray` command is not installed here; `pip install 'ray[default]'` provides it")
    return found


def run_ray(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ray ARGS`` and capture its output (tests replace this function)."""
    return subprocess.run(
        [ray_executable(), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def local_ray_addresses() -> set[str]:
    """GCS addresses of every Ray instance running on this machine (heads and ``ray.init`` instances)."""
    from ray._private.services import find_gcs_addresses

    find_gcs_addresses.cache_clear()
    return set(find_gcs_addresses())


def local_head() -> str | None:
    """The address of the head that ``ray start`` (so ``cluster up``) last started here, if it still runs."""
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    return address if address and address in local_ray_addresses() else None


def resolve_address(address: str | None) -> str | None:
    """The cluster to talk to: ``--address`` (or RAY_ADDRESS), else the local head, else ``None``."""
    return address or os.environ.get("RAY_ADDRESS") or local_head()


def head_command(
    port: int = DEFAULT_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> list[str]:
    """The ``ray start`` arguments of a local head whose dashboard only this machine can reach."""
    args = [
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    return args


@dataclass(frozen=True)
class HeadInfo:
    """A started head: its GCS address (for ``--address``) and its dashboard URL."""

    address: str
    dashboard: str


def start_head(
    port: int = DEFAULT_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> HeadInfo:
    """Start a Ray head on this machine with token authentication on (``transferlab cluster up``).

    The token is Ray's own (``ray get-auth-token --generate`` makes one in ~/.ray/auth_token when there
    is none); the head runs in the background until ``stop_head``.

    Raises:
        DriverError: a head already runs here or on ``port``, or ``ray start`` failed (with its output).
    """
    for what, value in (("--port", port), ("--dashboard-port", dashboard_port)):
        if not 0 < value < 65536:
            raise DriverError(f"{what} {value}: a TCP port is 1..65535")
    for what, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus)):
        if value is not None and value < 0:
            raise DriverError(f"{what} {value}: give 0 or more")
    running = local_head()
    if running:
        raise DriverError(
            f"a Ray head is already running on this machine at {running}; `transferlab cluster status` "
            "shows it and `transferlab cluster down` stops it"
        )
    taken = sorted(a for a in local_ray_addresses() if a.rpartition(":")[2] == str(port))
    if taken:
        raise DriverError(
            f"a Ray instance already listens on port {port} ({taken[0]}); choose another --port or stop it "
            "with `transferlab cluster down`"
        )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # keep Ray's token authentication on whatever the shell says
    made = run_ray(["get-auth-token", "--generate"], env=env)  # prints the token: never shown
    if made.returncode != 0:
        raise DriverError(f"could not create Ray's authentication token: {_tail(made)}")
    started = run_ray(head_command(port, dashboard_port, num_cpus, num_gpus), env=env)
    if started.returncode != 0:
        raise DriverError(f"`ray start --head` failed (exit status {started.returncode}): {_tail(started)}")
    address = local_head()
    if not address or not address.endswith(f":{port}"):
        address = f"127.0.0.1:{port}"
    return HeadInfo(address=address, dashboard=f"http://127.0.0.1:{dashboard_port}")


def stop_head(force: bool = False) -> list[str]:
    """Stop every Ray process of this machine (``ray stop``: Ray cannot stop one instance alone).

    Returns:
        The GCS addresses of the instances that were running.

    Raises:
        DriverError: no Ray runs here, or ``ray stop`` failed.
    """
    running = sorted(local_ray_addresses())
    if not running:
        raise DriverError("no Ray is running on this machine; nothing to stop")
    stopped = run_ray(["stop", *(["--force"] if force else [])])
    if stopped.returncode != 0:
        raise DriverError(f"`ray stop` failed (exit status {stopped.returncode}): {_tail(stopped)}")
    return running


def _tail(result: subprocess.CompletedProcess[str], lines: int = 8) -> str:
    text = "\n".join(ln for ln in f"{result.stdout or ''}\n{result.stderr or ''}".splitlines() if ln.strip())
    return "\n".join(text.splitlines()[-lines:]) or "no output"


@dataclass
class ClusterStatus:
    """What ``cluster status`` shows: where the cluster is, its dashboard, nodes and resources."""

    address: str
    dashboard: str | None
    authentication: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, float] = field(default_factory=dict)
    available: dict[str, float] = field(default_factory=dict)


def cluster_status(address: str | None = None) -> ClusterStatus:
    """Connect to the cluster at ``address`` (default: the local head) and describe it.

    Raises:
        DriverError: no address was given and no head runs here, or the cluster cannot be reached.
    """
    target = resolve_address(address)
    if target is None:
        others = sorted(local_ray_addresses())
        extra = f" (other Ray instances here, not started as a head: {', '.join(others)})" if others else ""
        raise DriverError(
            f"no Ray head is running on this machine{extra}; `transferlab cluster up` starts one"
        )
    ensure_ray(target)
    import ray

    try:
        dashboard: str | None = dashboard_url(target)
    except DriverError:
        dashboard = None
    nodes = [
        {
            "node": n.get("NodeManagerAddress", "?"),
            "head": "node:__internal_head__" in n.get("Resources", {}),
            "alive": bool(n.get("Alive")),
            "resources": n.get("Resources", {}),
        }
        for n in ray.nodes()
    ]
    return ClusterStatus(
        address=_gcs_address() or target,
        dashboard=dashboard,
        authentication=authentication_mode(dashboard),
        nodes=nodes,
        total=dict(ray.cluster_resources()),
        available=dict(ray.available_resources()),
    )


def authentication_mode(dashboard: str | None) -> str:
    """``token`` or ``disabled`` as the dashboard reports it; ``unknown`` without one."""
    if not dashboard:
        return "unknown"
    import requests

    try:
        reply = requests.get(f"{dashboard}/api/authentication_mode", timeout=HTTP_TIMEOUT_S)
        return str(reply.json().get("authentication_mode", "unknown"))
    except (requests.RequestException, ValueError):
        return "unknown"


# -- the dashboard and its Jobs API -------------------------------------------------------------------


def dashboard_url(address: str) -> str:
    """The HTTP address of the dashboard (and Jobs API) of the cluster at ``address``.

    RAY_API_SERVER_ADDRESS wins, as in Ray's own ``ray job`` commands; otherwise the head publishes
    its dashboard address in the GCS, which is read without joining the cluster as a driver.
    """
    explicit = os.environ.get("RAY_API_SERVER_ADDRESS")
    if explicit:
        return (explicit if "://" in explicit else f"http://{explicit}").rstrip("/")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    use_ray_token()
    from ray._private import ray_constants

    key = ray_constants.DASHBOARD_ADDRESS.encode()
    namespace = ray_constants.KV_NAMESPACE_DASHBOARD
    if address.startswith("ray://"):
        ensure_ray(address)
        from ray.experimental.internal_kv import _internal_kv_get

        value = _internal_kv_get(key, namespace=namespace)
    else:
        probe_ray_address(address)
        from ray._raylet import GcsClient

        try:
            value = GcsClient(address=address).internal_kv_get(key, namespace, timeout=HTTP_TIMEOUT_S)
        except Exception as exc:  # Ray's RpcError, AuthenticationError, ...
            raise DriverError(f"could not ask the Ray cluster at {address} for its dashboard: {exc}") from exc
    if not value:
        raise DriverError(
            f"the Ray cluster at {address} runs no dashboard, so it has no Jobs API; start its head with one "
            "(`transferlab cluster up` does, as does `ray start --head --include-dashboard=true`)"
        )
    return f"http://{value.decode()}"


def job_client(dashboard: str) -> Any:
    """A ``JobSubmissionClient`` for the dashboard (sending Ray's token when this process has one)."""
    use_ray_token()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(dashboard)
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError
        raise DriverError(f"could not reach the Ray Jobs API at {dashboard}: {exc}") from exc


def with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()``, or a ``DriverError`` after ``seconds``: a hung cluster must not hang ``status``.

    The call runs in a daemon thread that is abandoned when late (Ray's clients have no overall timeout).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="transferlab-ray-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DriverError(f"{what} took more than {seconds:g} s; is the cluster overloaded or unreachable?")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- detached studies -----------------------------------------------------------------------------------


def job_store_url(db: str | None) -> tuple[str, bool]:
    """The store URL a job's driver opens, and whether a password was left out of it.

    A SQLite path is made absolute (the job runs in another working directory). The password is never
    part of it: the entrypoint and metadata show in the dashboard, so the job's driver must find the
    password on the cluster (``~/.pgpass``, ``PGPASSWORD`` where the head was started).
    """
    from transferlab.service.store.database import mask_url, resolve_url, sqlite_file

    url = resolve_url(db)
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is None:
            raise DriverError(f"a Ray job cannot open the in-memory database {mask_url(url)}; give a file")
        url = url.set(database=str(path))
    withheld = url.password is not None
    # URL.set ignores None; the URL is a named tuple.
    return url._replace(password=None).render_as_string(hide_password=False), withheld


@dataclass(frozen=True)
class DetachedStudy:
    """A study recorded in the store and submitted as a Ray Job."""

    experiment_id: int
    trials: int
    job_id: str
    address: str
    dashboard: str
    password_withheld: bool


def submit_detached(
    vspec: ValidatedSpec,
    *,
    db: str | None = None,
    address: str | None = None,
    runs: str | Path | None = None,
    shared_runs: bool | None = None,
) -> DetachedStudy:
    """Record a validated study and submit ``transferlab resume EXP`` as a Ray Job that runs it.

    Nothing is recorded unless the cluster is reachable, can schedule the trials and serve the store
    (``check_resources``, ``check_cluster``) and has a Jobs API.

    Raises:
        DriverError: no cluster (none given, no local head), or one of the checks above failed.
    """
    from transferlab.service.planner import plan_trials
    from transferlab.service.store import Store, resolve_url

    target = resolve_address(address)
    if target is None:
        raise DriverError(
            "--detach needs a running Ray cluster that outlives this command: start a local head with "
            "`transferlab cluster up`, or give --address ADDR (env RAY_ADDRESS)"
        )
    store_url, withheld = job_store_url(db)
    trials = len(plan_trials(vspec))
    storage = runs_dir(runs)
    ensure_ray(target)
    check_resources(vspec)
    check_cluster(resolve_url(db), storage, shared_runs=shared_runs)
    gcs = _gcs_address()
    dashboard = dashboard_url(target)
    client = job_client(dashboard)
    store = Store.open(db)
    try:
        exp_id = record_study(vspec, store, storage)
        try:
            job_id = client.submit_job(
                entrypoint=job_entrypoint(exp_id, store_url, gcs, target, shared_runs),
                submission_id=f"transferlab-{_dirname(vspec.spec.name)}-{exp_id}-{secrets.token_hex(3)}",
                # `ray job stop` sends SIGTERM, then SIGKILL after 3 s by default: too soon for the driver
                # to stop its trials and mark them cancelled (the supervisor reads this from the job's env).
                runtime_env={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S)}},
                metadata={
                    JOB_EXPERIMENT_KEY: str(exp_id),
                    JOB_STORE_KEY: store_url,
                    JOB_NAME_KEY: vspec.spec.name,
                },
            )
        except Exception as exc:
            store.set_experiment_status(exp_id, "cancelled", finished=True)
            raise DriverError(
                f"experiment {exp_id} is recorded but the Ray job could not be submitted ({exc}); "
                f"`transferlab resume {exp_id}` runs it"
            ) from exc
    finally:
        store.close()
    return DetachedStudy(exp_id, trials, job_id, gcs or target, dashboard, withheld)


def _gcs_address() -> str | None:
    """The GCS address of the cluster this process is connected to (``None`` if Ray cannot say)."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection may not expose it
        return None


def job_entrypoint(
    exp_id: int, store_url: str, gcs: str | None, address: str, shared_runs: bool | None
) -> str:
    """The job's shell command: ``transferlab resume EXP --db URL --address GCS``.

    The GCS address is explicit because Ray points a job's RAY_ADDRESS at the most recently started
    local cluster, which need not be this one. Through a Ray Client address the cluster is another
    machine, so ``transferlab`` must be on its PATH; otherwise this environment's own script is used.
    """
    program = Path(sys.executable).with_name("transferlab")
    parts = ["transferlab" if address.startswith("ray://") or not program.is_file() else str(program)]
    parts += ["resume", str(exp_id), "--db", store_url]
    if gcs:
        parts += ["--address", gcs]
    if shared_runs:
        parts.append("--shared-runs-dir")
    return shlex.join(parts)


@dataclass
class ExperimentJobs:
    """The Ray jobs of one store's experiments on one cluster, newest first per experiment."""

    address: str
    dashboard: str
    client: Any
    by_experiment: dict[int, list[Any]]

    def latest(self, experiment_id: int) -> Any | None:
        jobs = self.by_experiment.get(experiment_id)
        return jobs[0] if jobs else None


def experiment_jobs(db: str | None, address: str | None, timeout: float = LOOKUP_TIMEOUT_S) -> ExperimentJobs:
    """Find the jobs whose metadata names an experiment of the store at ``db``.

    Raises:
        DriverError: no cluster to ask, or it did not answer within ``timeout`` seconds.
    """
    target = resolve_address(address)
    if target is None:
        raise DriverError("no Ray cluster to ask: no --address (or RAY_ADDRESS) and no Ray head runs here")
    store_url, _ = job_store_url(db)

    def lookup() -> tuple[str, Any, list[Any]]:
        dashboard = dashboard_url(target)
        client = job_client(dashboard)
        try:
            return dashboard, client, client.list_jobs()
        except Exception as exc:  # requests' errors, Ray's AuthenticationError, RuntimeError
            raise DriverError(f"could not list the jobs of the Ray cluster at {target}: {exc}") from exc

    dashboard, client, jobs = with_deadline(
        lookup, timeout, f"asking the Ray cluster at {target} for its jobs"
    )
    found: dict[int, list[Any]] = {}
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        meta = job.metadata or {}
        exp = str(meta.get(JOB_EXPERIMENT_KEY, ""))
        if meta.get(JOB_STORE_KEY) == store_url and exp.isdigit():
            found.setdefault(int(exp), []).append(job)
    return ExperimentJobs(target, dashboard, client, found)


def job_logs(jobs: ExperimentJobs, job_id: str, follow: bool = False) -> Iterator[str]:
    """The driver output of a job: everything so far, or (``follow``) chunks until the job ends."""
    if not follow:
        yield with_deadline(
            lambda: jobs.client.get_job_logs(job_id), LOOKUP_TIMEOUT_S, "reading the job's logs"
        )
        return
    import asyncio
    import logging

    # Ray's SDK logs at INFO when the log stream closes, which is the normal end here.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    stream = jobs.client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()
