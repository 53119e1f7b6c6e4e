"""A real deployment for end-to-end tests: a code server and a ``dagster-daemon`` on a temp
DAGSTER_HOME, as in production. ``Deployment`` can kill and restart each process (the fault
suite does); ``deployment()`` is the plain context manager the end-to-end tests use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, select, text

from flux_dagster.db.engine import normalize_url, session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster_tests.conftest import PG_ADMIN_URL

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = ("completed", "failed", "cancelled")
# Every process of one deployment (and what they fork: zygote, run workers) carries this
# variable, so teardown finds them even once orphaned.
MARKER_ENV = "FLUX_TEST_DEPLOYMENT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"port {port} never opened; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def postgres_database(admin_url: str = PG_ADMIN_URL):
    """A fresh database on the server of ``admin_url`` (the machine's Postgres by default);
    yields its URL, drops it afterwards."""
    name = f"flux_e2e_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class Deployment:
    """The code server and the daemon of one test, each startable, killable and restartable."""

    def __init__(self, tmp_path: Path, app_db_url: str, env_extra: dict[str, str], daemon_command: list | None = None,
                 daemon_started=lambda process: None):
        """``daemon_command`` replaces ``dagster-daemon run`` (``-w workspace.yaml`` is appended);
        ``daemon_started`` gets the daemon's Popen each time it starts."""
        self.tmp_path = tmp_path
        self.daemon_command = daemon_command or [BIN / "dagster-daemon", "run"]
        self.daemon_started = daemon_started
        home = tmp_path / "dagster_home"
        home.mkdir(exist_ok=True)
        shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
        self.port = free_port()
        self.workspace = tmp_path / "workspace.yaml"
        self.workspace.write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {self.port}\n"
            "      location_name: flux_dagster\n"
        )
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, "DAGSTER_HOME": str(home), "FLUX_DATABASE_URL": app_db_url,
                    "FLUX_HOME": str(tmp_path), "FLUX_RETRY_DELAY_SCALE": "0.01", MARKER_ENV: self.marker,
                    **env_extra}
        self.log_path = tmp_path / "deployment.log"
        self._log = open(self.log_path, "a")
        self.code_server: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.webserver: subprocess.Popen | None = None
        self.webserver_port: int | None = None

    def _spawn(self, *args) -> subprocess.Popen:
        return subprocess.Popen([*args], env=self.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def start_code_server(self) -> None:
        self.code_server = self._spawn(BIN / "dagster", "code-server", "start", "-m", "flux_dagster.definitions",
                                       "-h", "127.0.0.1", "-p", str(self.port))
        wait_for_port(self.port, self.code_server, 180, self.log_path)

    def start_daemon(self) -> None:
        self.daemon = self._spawn(*self.daemon_command, "-w", self.workspace)
        self.daemon_started(self.daemon)

    def start_webserver(self) -> str:
        """The Dagster UI's server (what an operator clicks through); returns its GraphQL URL."""
        self.webserver_port = free_port()
        self.webserver = self._spawn(BIN / "dagster-webserver", "-w", self.workspace, "-h", "127.0.0.1",
                                     "-p", str(self.webserver_port))
        wait_for_port(self.webserver_port, self.webserver, 300, self.log_path)
        return f"http://127.0.0.1:{self.webserver_port}/graphql"

    def start(self) -> "Deployment":
        self.start_code_server()
        self.start_daemon()
        return self

    @staticmethod
    def _kill(process: subprocess.Popen | None) -> None:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(20)

    def kill_code_server(self) -> None:
        """SIGKILL, as an OOM kill or a crashed container would."""
        self._kill(self.code_server)

    def kill_daemon(self) -> None:
        self._kill(self.daemon)

    def kill_all(self) -> None:
        """Every process of the deployment, the zygote and run workers included (a host restart)."""
        for pid in marked_pids(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in (self.webserver, self.daemon, self.code_server):
            if process is not None:
                process.wait(20)

    def stop(self) -> None:
        """SIGTERM, up to 20 s in all to exit, then SIGKILL to whatever is left (orphaned zygotes
        and run workers included)."""
        processes = [p for p in (self.webserver, self.daemon, self.code_server) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 20
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()
        self._log.close()


@contextmanager
def deployment(tmp_path: Path, app_db_url: str, env_extra: dict[str, str], daemon_command: list | None = None,
               daemon_started=lambda process: None):
    """A code server and a daemon, as in production, on a temp DAGSTER_HOME; yields their env.
    Arguments as ``Deployment``'s."""
    running = Deployment(tmp_path, app_db_url, env_extra, daemon_command, daemon_started)
    try:
        running.start()
        yield running.env
    finally:
        running.stop()


def wait_terminal(url: str, ids: list[int], timeout_s: float = 180) -> dict[int, PendingExecution]:
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(url) as s:
            rows = {r.id: r for r in s.scalars(select(PendingExecution).where(PendingExecution.id.in_(ids)))}
        if all(r.status in TERMINAL for r in rows.values()):
            return rows
        assert time.monotonic() < deadline, {i: r.status for i, r in rows.items()}
        time.sleep(0.25)


def runs_by_row(env: dict[str, str]) -> dict[str, list[str]]:
    """Every Dagster run the daemon launched, grouped by pending execution id."""
    code = (
        "import json; from dagster import DagsterInstance\n"
        "i = DagsterInstance.get()\n"
        "out = {}\n"
        "for r in i.get_runs():\n"
        "    out.setdefault(r.tags.get('flux/pending_execution_id', '-'), []).append(r.status.value)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
