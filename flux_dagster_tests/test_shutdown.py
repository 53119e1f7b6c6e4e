"""Clean shutdown through a real daemon (``flux-dagster daemon``, the daemon container's command)
and code server: SIGTERM with runs in flight lets a short one finish within the grace period,
terminates the long one and offers its execution again, and leaves no process behind."""

import signal
import time
import uuid

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from flux_dagster import queue
from flux_dagster.db.engine import create_schema, session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster.supervisor import descendants
from flux_dagster_tests.conftest import add_node
from flux_dagster_tests.test_e2e_daemon import BIN, deployment

# A slow machine can take minutes to start the deployment and the runs.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

GRACE_S = 12


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait_status(url: str, ids: list[int], status: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(url) as s:
            statuses = {r.id: r.status for r in s.scalars(select(PendingExecution).where(PendingExecution.id.in_(ids)))}
        if all(v == status for v in statuses.values()):
            return
        assert time.monotonic() < deadline, statuses
        time.sleep(0.25)


def test_sigterm_finishes_short_runs_and_requeues_the_rest(tmp_path, monkeypatch):
    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    create_schema(app_url)
    flow_id, quick = add_node(app_url, "counterNode", {"counterMode": "wait", "waitSeconds": 4, "text": "q"})
    _, slow = add_node(app_url, "counterNode", {"counterMode": "wait", "waitSeconds": 600, "text": "s"},
                       flow_id=flow_id)

    def insert(node_id):
        with session_scope(app_url) as s:
            return queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                                 user_id="user-1").id

    daemons = []
    with deployment(tmp_path, app_url, {"FLUX_SHUTDOWN_GRACE_S": str(GRACE_S)},
                    daemon_command=[BIN / "flux-dagster", "daemon"], daemon_started=daemons.append) as env:
        slow_id = insert(slow)
        _wait_status(app_url, [slow_id], "running")
        quick_id = insert(quick)
        _wait_status(app_url, [quick_id], "running")
        supervisor = daemons[0]
        processes = descendants(supervisor.pid)
        assert len(processes) >= 4  # daemon, zygote, two run workers
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(GRACE_S + 60)
        left = [pid for pid in processes if _alive(pid)]
        assert left == [], [open(f"/proc/{p}/cmdline").read() for p in left]
        monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
        monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
        with DagsterInstance.get() as instance:
            runs = {r.tags.get("flux/pending_execution_id"): [r.status.value] for r in instance.get_runs()}

    with session_scope(app_url) as s:
        rows = {r.id: r for r in s.scalars(select(PendingExecution))}
    assert rows[quick_id].status == "completed"  # finished within the grace period
    interrupted = rows[slow_id]
    assert interrupted.status == "cancelled" and "queued again as pending execution" in interrupted.error
    [offered] = [r for r in rows.values() if r.id not in (quick_id, slow_id)]
    assert (offered.status, offered.exec_id, offered.node_id) == ("pending", interrupted.exec_id, slow)
    assert f"pending execution {offered.id}" in interrupted.error
    assert runs == {str(quick_id): ["SUCCESS"], str(slow_id): ["CANCELED"]}
