"""Cancellation at random moments (goal 5 of issue 8): ``cancel_requested_at`` set on 25 of 50
rows while they are pending, launched, running or done."""

from __future__ import annotations

import random
import time

import pytest

from flux_dagster_tests.faults.harness import random_moments

pytestmark = pytest.mark.faults


def test_25_of_50_cancelled_at_random_moments(world, report):
    world.llm.latency_s = 3  # long enough for cancels to land while runs are in the LLM call
    executions = world.burst(50)
    started = time.monotonic()
    chosen = random.Random(5).sample(executions, 25)
    at_cancel: dict[int, str] = {}
    for moment, execution in zip(random_moments(25, 40), chosen):
        time.sleep(max(0.0, started + moment - time.monotonic()))
        at_cancel[execution.pending_id] = world.cancel(execution)
    drain = world.wait(executions, 600, started,
                       until=lambda: not [r for r in world.runs() if r.status in ("CANCELING", "STARTING", "STARTED", "QUEUED")])
    outcome = report(world.outcome("25 of 50 cancelled at random moments", executions, drain))
    rows = world.rows(executions)
    runs = {}
    for run in world.runs():
        runs[run.pending_id] = run.status  # the latest run of each row
    problems = []
    for e in executions:
        row, was = rows[e.pending_id], at_cancel.get(e.pending_id)
        run_status = runs.get(str(e.pending_id))
        generated = len(world.llm.generations(e.node_id))
        charged = len(world.main_api.keys_by_execution().get(e.exec_id, ()))
        if was in ("pending", "launched") and (row.status != "cancelled" or generated or charged):
            problems.append(f"row {e.pending_id} cancelled while {was}: ended {row.status}, "
                            f"{generated} LLM call(s), {charged} charge(s)")
        if was == "running" and row.status not in ("cancelled", "completed"):
            problems.append(f"row {e.pending_id} cancelled while running ended {row.status}")
        if was is None and row.status != "completed":
            problems.append(f"row {e.pending_id} not cancelled ended {row.status}: {row.error}")
        expected_run = {"completed": "SUCCESS", "cancelled": "CANCELED", "failed": "FAILURE"}[row.status] \
            if row.status in ("completed", "cancelled", "failed") else "?"
        if run_status is not None and run_status != expected_run:
            problems.append(f"row {e.pending_id} is {row.status} but its run is {run_status}")
    assert not problems, f"{len(problems)} problems: " + "; ".join(problems[:8])
    assert outcome.lost == outcome.double_charges == 0
    assert outcome.unnotified == 0
