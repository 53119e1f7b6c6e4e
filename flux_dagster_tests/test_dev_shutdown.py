"""Ctrl-C on ``make dev`` (``flux-dagster dev``: dagster dev = webserver + daemon + code server)
with a run in flight: SIGINT to the whole process group, as a terminal sends it. No process is
left, the execution is not left ``running`` (terminated after the grace period and queued
again), and no traceback. Slow (dagster dev starts a webserver): ``make test-slow``."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import select

from flux_dagster import queue
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster.supervisor import descendants
from flux_dagster_tests.conftest import add_node
from flux_dagster_tests.test_e2e_daemon import REPO, free_port
from flux_dagster_tests.test_shutdown import _alive, _wait_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_ctrl_c_on_dev_leaves_nothing_running(tmp_path):
    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    env = {**os.environ, "FLUX_HOME": str(tmp_path), "FLUX_SHUTDOWN_GRACE_S": "3"}
    env.pop("DAGSTER_HOME", None)
    env.pop("FLUX_DATABASE_URL", None)
    log = open(tmp_path / "dev.log", "w")
    dev = subprocess.Popen([sys.executable, "-m", "flux_dagster.cli", "dev", "--port", str(free_port()), "--no-demo"],
                           env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "app.db").exists() or "UI http" not in (tmp_path / "dev.log").read_text():
            assert dev.poll() is None and time.monotonic() < deadline, (tmp_path / "dev.log").read_text()
            time.sleep(0.5)
        flow_id, node_id = add_node(app_url, "counterNode", {"counterMode": "wait", "waitSeconds": 600})
        with session_scope(app_url) as s:
            pending_id = queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                                       user_id="user-1").id
        _wait_status(app_url, [pending_id], "running", timeout_s=240)
        processes = descendants(dev.pid)
        log.flush()
        before_signal = len((tmp_path / "dev.log").read_text())
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        dev.wait(120)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert [pid for pid in processes if _alive(pid)] == []
    assert "BrokenPipeError" not in output
    shutdown = output[before_signal:]  # (a sensor tick may log an error while dagster dev loads the code)
    assert "Traceback" not in shutdown, shutdown[shutdown.find("Traceback") - 500:][:4000]
    with session_scope(app_url) as s:
        rows = {r.id: r for r in s.scalars(select(PendingExecution))}
    assert rows[pending_id].status == "cancelled" and "queued again" in rows[pending_id].error
    assert [r.status for r in rows.values() if r.id != pending_id] == ["pending"]
