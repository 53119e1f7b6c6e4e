"""Processes of the deployment die mid-burst (goals 1 and 3 of issue 8): the code server, the
daemon, both at once with everything they forked, or one run worker in the middle of an LLM call."""

from __future__ import annotations

import os
import signal
import time

import pytest

from flux_dagster_tests.deployment import marked_pids
from flux_dagster_tests.faults.harness import FULL, World
from flux_dagster_tests.faults.test_dependencies import burst_through

pytestmark = pytest.mark.faults


def test_code_server_killed_and_restarted(world, report):
    """Down for 60 s, the longest outage goal 1 covers."""
    burst_through(world, report, "code server SIGKILLed, restarted after 60 s (burst of 100)", 100,
                  lambda later: later(3, world.deployment.kill_code_server, 60, world.deployment.start_code_server))


@pytest.mark.faults_ci
@pytest.mark.timeout(600)  # bounded waits inside; a loaded machine is slow, not wrong
def test_daemon_killed_and_restarted(world, report):
    n = 200 if FULL else 10
    burst_through(world, report, f"daemon SIGKILLed, restarted after 10 s (burst of {n})", n,
                  lambda later: later(4, world.deployment.kill_daemon, 10, world.deployment.start_daemon))


def test_whole_deployment_killed_and_restarted(world, report):
    """Daemon, code server, zygote and run workers all SIGKILLed at once (a host restart)."""
    burst_through(world, report, "daemon + code server + run workers SIGKILLed, restarted after 10 s (burst of 200)",
                  200, lambda later: later(5, world.deployment.kill_all, 10, world.deployment.start))


def _kill_worker(world: World, pid: int) -> None:
    assert pid in marked_pids(world.deployment.marker), "not a process of this deployment"
    os.kill(pid, signal.SIGKILL)


def _wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    return None


def test_run_worker_killed_mid_llm_call(world, report):
    """Goal 3: retried automatically and completed, charged once (within 2 min: see the table)."""
    world.llm.latency_s = 30
    [execution] = world.burst(1)
    started = time.monotonic()
    assert _wait_for(lambda: world.llm.generations(execution.node_id), 120), "the LLM was never called"
    [run] = world.runs_of(execution)
    world.llm.latency_s = 0
    _kill_worker(world, run.worker_pid)
    drain = world.wait([execution], 300, started)
    outcome = report(world.outcome("run worker SIGKILLed mid-LLM call", [execution], drain))
    row = world.rows([execution])[execution.pending_id]
    assert row.status == "completed", (row.status, row.error, [r.status for r in world.runs_of(execution)])
    assert len(world.main_api.keys_by_execution().get(execution.exec_id, ())) == 1
    assert outcome.unnotified == 0


def test_run_worker_that_keeps_dying_fails_bounded(world, report):
    """Every run worker of the execution is SIGKILLed as soon as it has a pid: the execution fails
    after a bounded number of attempts, with a message that says so."""
    world.llm.latency_s = 30
    [execution] = world.burst(1)
    started = time.monotonic()
    killed: set[int] = set()
    deadline = started + 480
    while time.monotonic() < deadline:
        runs = world.runs_of(execution)
        for run in runs:
            if run.worker_pid and run.worker_pid not in killed and run.status in ("STARTING", "STARTED"):
                killed.add(run.worker_pid)
                try:
                    _kill_worker(world, run.worker_pid)
                except (ProcessLookupError, AssertionError):
                    pass
        row = world.rows([execution])[execution.pending_id]
        if row.status in ("completed", "failed", "cancelled") and all(
                r.status in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            # stable for a while: no run retry pending
            time.sleep(20)
            if len(world.runs_of(execution)) == len(runs):
                break
        time.sleep(0.3)
    drain = world.wait([execution], 1, started)
    outcome = report(world.outcome(f"run worker SIGKILLed on every attempt ({len(killed)} kills)", [execution],
                                   time.monotonic() - started if drain is not None else None))
    row = world.rows([execution])[execution.pending_id]
    runs = world.runs_of(execution)
    assert row.status == "failed", row.status
    assert len(runs) > 1, "the run was never retried"
    assert len(runs) <= 10, f"{len(runs)} runs: not bounded"
    assert "attempt" in (row.error or "").lower(), row.error
    assert outcome.double_charges == 0
