"""A dependency goes away during a burst, then comes back (goals 1 and 2 of issue 8): every
execution still completes, charged exactly once, and its final status reaches Redis."""

from __future__ import annotations

import time

import pytest

from flux_dagster_tests.faults.harness import FULL, Later, World

pytestmark = pytest.mark.faults

DRAIN_BOUND_S = 600  # a scenario stops by itself: whatever is not terminal by then is "lost"


def burst_through(world: World, report, fault: str, n: int, inject) -> None:
    executions = world.burst(n)
    started = time.monotonic()
    later = Later()
    inject(later)
    drain = world.wait(executions, DRAIN_BOUND_S, started)
    later.join()
    outcome = report(world.outcome(fault, executions, drain))
    assert outcome.completed == n, world.failures(executions)
    assert (outcome.lost, outcome.duplicate_runs, outcome.double_charges) == (0, 0, 0)
    assert outcome.unnotified == 0, "some executions never had their final status published"


def test_redis_killed_20s(world, report):
    burst_through(world, report, "Redis killed 20 s", 50,
                  lambda later: later(2, world.redis.kill, 20, world.redis.start))


@pytest.mark.parametrize("seconds", [20, 60])
def test_main_api_refusing(world, report, seconds):
    burst_through(world, report, f"main API refusing connections {seconds} s", 50,
                  lambda later: later(2, lambda: world.main_api.outage(seconds)))


@pytest.mark.parametrize("seconds", [20, 60])
def test_main_api_500(world, report, seconds):
    burst_through(world, report, f"main API answering 500 {seconds} s", 50,
                  lambda later: later(2, lambda: world.main_api.outage(seconds, 500)))


def test_llm_429_retry_after_30s(world, report):
    burst_through(world, report, "LLM 429 (Retry-After: 5) 30 s", 20,
                  lambda later: later(1, lambda: world.llm.outage(30, 429, {"retry-after": "5"})))


def test_llm_500_30s(world, report):
    burst_through(world, report, "LLM 500 30 s", 20, lambda later: later(1, lambda: world.llm.outage(30, 500)))


def test_llm_broken_for_good_fails_clearly(world, report):
    """A provider that stays broken fails the execution with a clear message within 5 minutes."""
    world.llm.outage(float("inf"), 500)
    executions = world.burst(3)
    started = time.monotonic()
    drain = world.wait(executions, 420, started)
    outcome = report(world.outcome("LLM 500 for good (3 executions)", executions, drain))
    rows = world.rows(executions)
    assert outcome.failed == 3 and outcome.double_charges == 0
    for row in rows.values():
        assert row.error and len(row.error) <= 2000, row.error
        assert any(word in row.error.lower() for word in ("provider", "openai", "model")), row.error
    assert outcome.unnotified == 0


@pytest.mark.faults_ci
@pytest.mark.timeout(600)  # bounded waits inside; a loaded machine is slow, not wrong
def test_app_db_connections_terminated(world, report):
    """pg_terminate_backend on every app-DB connection, three times during the burst."""
    n = 100 if FULL else 10
    burst_through(world, report, f"app-DB connections terminated ×3 (burst of {n})", n,
                  lambda later: later(2, world.terminate_app_db_connections, 3, world.terminate_app_db_connections,
                                      3, world.terminate_app_db_connections))
