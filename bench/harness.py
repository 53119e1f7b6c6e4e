"""The pieces of a benchmark deployment: databases, pgbouncer, code server + daemon, and a sampler
of CPU and memory over every process they start. Loopback only, every wait bounded."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("FLUX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"port {port} never opened; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextmanager
def postgres_database(prefix: str):
    from flux_dagster.db.engine import normalize_url

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def pg_url(database: str, port: int | None = None) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    if port is not None:
        base = base.rsplit(":", 1)[0] + f":{port}"
    return f"{base}/{database}"


@contextmanager
def pgbouncer(pool_mode: str = "session", pool_size: int = 60):
    """A pgbouncer in front of the machine's Postgres; yields its port.

    It saves Postgres a backend fork per connection (dagster-postgres opens one per storage call
    outside pooled mode). Transaction mode also shares each server connection between clients, so
    the server sees at most ``pool_size`` per database (psycopg2 prepares no statements, so
    nothing is lost; docs/production.md)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-pgbouncer-"))
    os.chmod(workdir, 0o777)  # pgbouncer refuses to run as root: it runs as postgres
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n* = host=127.0.0.1 port=5432 user=postgres\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = any\npool_mode = {pool_mode}\nmax_client_conn = 4000\ndefault_pool_size = {pool_size}\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {workdir / 'pgbouncer.log'}\npidfile = {workdir / 'pgbouncer.pid'}\n"
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    os.chmod(ini, 0o644)
    process = subprocess.Popen([binary, "-u", "postgres", str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, 15, ini)
        yield port, process
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def process_kind(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
        if "flux_dagster.launcher.zygote" in cmd:
            parent = proc.parent()
            return "run worker" if parent and "flux_dagster.launcher.zygote" in " ".join(parent.cmdline()) else "zygote"
        if "multiprocessing" in cmd or "spawn_main" in cmd:
            return "run worker"
        if "dagster-daemon" in cmd:
            return "daemon"
        if "code-server" in cmd or "api grpc" in cmd:
            return "code server"
        if "pgbouncer" in cmd:
            return "pgbouncer"
        if "dagster-webserver" in cmd:
            return "webserver"
    except psutil.Error:
        pass
    return "other"


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for root in roots:
        try:
            out.append(root)
            out.extend(root.children(recursive=True))
        except psutil.Error:
            pass
    return out


def tree_pss_mb(roots: list[psutil.Process]) -> float:
    """The sum of PSS over the roots and their descendants: each shared page counted once."""
    total = 0.0
    for proc in tree(roots):
        try:
            total += proc.memory_full_info().pss / 2**20
        except psutil.Error:
            pass
    return total


def tree_cpu(roots: list[psutil.Process]) -> float:
    """CPU seconds used so far by the roots and every descendant, live or already reaped (a reaped
    process's time is in its parent's children_* counters, a live one's in its own)."""
    total = 0.0
    for proc in tree(roots):
        try:
            total += _cpu(proc)
        except psutil.Error:
            pass
    return total


def tree_cpu_by_kind(roots: list[psutil.Process]) -> dict[str, float]:
    """``tree_cpu`` split by process kind; time of reaped run workers goes to "run worker" (they
    are the only children the zygote and the stock code server reap while running)."""
    totals: dict[str, float] = defaultdict(float)
    for proc in tree(roots):
        try:
            kind, t = process_kind(proc), proc.cpu_times()
        except psutil.Error:
            continue
        totals[kind] += t.user + t.system
        totals["run worker" if kind in ("zygote", "code server") else kind] += t.children_user + t.children_system
    return totals


def postgres_backend_cpu(databases: list[str], seen: dict[int, float]) -> float:
    """CPU-s of the Postgres backends serving ``databases``, live or gone: ``seen`` keeps each
    backend's last reading between calls (a backend's command line names its database)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "postgres" and any(f" {db} " in cmdline for db in databases):
                t = proc.cpu_times()
                seen[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return sum(seen.values())


def postgres_roots() -> list[psutil.Process]:
    """The machine's postmaster (its backends are its children)."""
    roots = []
    for proc in psutil.process_iter(["name", "ppid"]):
        try:
            if proc.info["name"] == "postgres" and (proc.parent() is None or proc.parent().name() != "postgres"):
                roots.append(proc)
        except psutil.Error:
            pass
    return roots


@dataclass
class Sampler:
    """Samples RSS (and USS for run workers) of every process in the deployment's tree."""

    roots: list[psutil.Process]
    interval_s: float = 0.5
    peak_rss: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak_total_rss: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    worker_uss: list[float] = field(default_factory=list)
    peak_workers: int = 0
    peak_workers_uss: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            totals: dict[str, float] = defaultdict(float)
            workers, workers_uss = 0, 0.0
            for proc in tree(self.roots):
                try:
                    kind = process_kind(proc)
                    rss = proc.memory_info().rss / 2**20
                    if kind == "run worker":
                        workers += 1
                        self.worker_uss.append(proc.memory_full_info().uss / 2**20)
                        workers_uss += self.worker_uss[-1]
                except psutil.Error:
                    continue
                self.peak_rss[kind] = max(self.peak_rss[kind], rss)
                totals[kind] += rss
            for kind, total in totals.items():
                self.peak_total_rss[kind] = max(self.peak_total_rss[kind], total)
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_workers_uss = max(self.peak_workers_uss, workers_uss)

    def reset(self) -> None:
        self.peak_rss.clear()
        self.peak_total_rss.clear()
        self.worker_uss.clear()
        self.peak_workers = 0
        self.peak_workers_uss = 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Deployment:
    env: dict[str, str]
    app_url: str
    roots: list[psutil.Process]
    workdir: Path
    log: Path


@contextmanager
def deployment(mode: str, storage: str, env_extra: dict[str, str], use_pgbouncer: bool,
               pgbouncer_mode: str = "session", pgbouncer_pool_size: int = 60):
    """A code server and a daemon on a temp DAGSTER_HOME, as in the e2e test and production."""
    from flux_dagster.db.engine import create_schema

    workdir = Path(tempfile.mkdtemp(prefix=f"flux-bench-{storage}-{mode}-"))
    home = workdir / "dagster_home"
    home.mkdir()
    config = REPO / ("dagster.yaml" if mode == "ours" else "bench/stock_dagster.yaml")
    shutil.copyfile(config, home / "dagster.yaml")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        extra_roots: list[psutil.Process] = []
        if storage == "postgres":
            app_db = stack.enter_context(postgres_database("flux_bench_app"))
            dagster_db = stack.enter_context(postgres_database("flux_bench_dagster"))
            port = None
            if use_pgbouncer:
                port, bouncer = stack.enter_context(pgbouncer(pgbouncer_mode, pgbouncer_pool_size))
                extra_roots.append(psutil.Process(bouncer.pid))
            app_url, dagster_url = pg_url(app_db, port), pg_url(dagster_db, port)
            storage_env = {"DAGSTER_PG_URL": dagster_url}
        else:
            app_url, storage_env = f"sqlite:///{workdir / 'app.db'}", {}
        create_schema(app_url)
        grpc_port = free_port()
        (workdir / "workspace.yaml").write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {grpc_port}\n      location_name: flux_dagster\n"
        )
        stock_sensor = ({"FLUX_SENSOR_LONG_POLL_S": "0", "FLUX_SENSOR_SHARDS": "1", "FLUX_SENSOR_MAX_QUEUED_RUNS": "0"}
                        if mode == "stock" else {})
        env = {**os.environ, "DAGSTER_HOME": str(home), "FLUX_DATABASE_URL": app_url, "FLUX_HOME": str(workdir),
               "DAGSTER_TELEMETRY_DISABLED": "1", **storage_env, **stock_sensor, **env_extra}
        log_path = workdir / "deployment.log"
        log = open(log_path, "w")
        stack.callback(log.close)
        code_server = subprocess.Popen(
            [BIN / "dagster", "code-server", "start", "-m", "flux_dagster.definitions", "-h", "127.0.0.1",
             "-p", str(grpc_port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        stack.callback(_stop, code_server)
        wait_for_port(grpc_port, code_server, 90, log_path)
        daemon = subprocess.Popen([BIN / "dagster-daemon", "run", "-w", workdir / "workspace.yaml"],
                                  env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop, daemon)
        roots = [psutil.Process(code_server.pid), psutil.Process(daemon.pid), *extra_roots]
        yield Deployment(env=env, app_url=app_url, roots=roots, workdir=workdir, log=log_path)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def in_flight_llm(latency_s: float):
    """The loopback OpenAI server, counting completion requests open at once (from their arrival
    to the stream's last byte): the executions doing their work at the same time."""
    import threading

    from flux_dagster_tests.fakes.http import Reply
    from flux_dagster_tests.fakes.llm import FakeLlm

    class InFlightLlm(FakeLlm):
        def __init__(self, **kwargs):
            self._count_lock = threading.Lock()
            self.open = self.peak_open = 0
            super().__init__(**kwargs)

        def _handle(self, req) -> Reply:
            reply = super()._handle(req)
            if reply.chunks is None:
                return reply
            with self._count_lock:
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
            return Reply(reply.status, reply.body, reply.headers, reply.delay_s, self._counted(reply.chunks))

        def _counted(self, chunks):
            try:
                yield from chunks
            finally:
                with self._count_lock:
                    self.open -= 1

    return InFlightLlm(latency_s=latency_s)


def insert_executions(app_url: str, n: int, node_id: str = "summarize") -> list[int]:
    """``n`` rows of the demo flow's node in ``pending_executions``, as the main API inserts them
    (ten users, so the sensor's per-user fairness is exercised); their ids."""
    import uuid

    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution

    with session_scope(app_url) as s:
        rows = [PendingExecution(kind="node", exec_id=str(uuid.uuid4()), flow_id=demo.DEMO_FLOW, node_id=node_id,
                                 user_id=f"bench-user-{i % 10}", session_id="bench") for i in range(n)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def execution_rows(app_url: str, ids: list[int]) -> dict:
    """The ``pending_executions`` rows of ``ids``, by id."""
    from sqlalchemy import select

    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution

    with session_scope(app_url) as s:
        return {r.id: r for r in s.scalars(select(PendingExecution).where(PendingExecution.id.in_(ids)))}
