"""Re-execution from the UI (goal 4 of issue 8): the operator's buttons, sent as the UI sends them
(``launchPipelineReexecution`` to a dagster-webserver); a node already completed under the
execution's ``execId`` is never generated or charged again, and the run says so and succeeds."""

from __future__ import annotations

import time

import pytest

from flux_dagster.ops.guards import REUSED_MESSAGE

pytestmark = pytest.mark.faults


def _generations_and_charges(world, execution) -> tuple[int, int]:
    return (len(world.llm.generations(execution.node_id)),
            len(world.main_api.keys_by_execution().get(execution.exec_id, ())))


def test_completed_run_reexecuted_all_steps(world, report):
    [execution] = world.burst(1)
    world.wait([execution], 180)
    parent = world.rows([execution])[execution.pending_id].dagster_run_id
    assert _generations_and_charges(world, execution) == (1, 1)
    started = time.monotonic()
    child = world.reexecute(parent, "ALL_STEPS")
    status = world.wait_run(child)
    drain = world.wait([execution], 60, started)
    report(world.outcome("completed run re-executed (all steps) from the UI", [execution], drain))
    assert status == "SUCCESS", world.run_log(child)[-2000:]
    assert _generations_and_charges(world, execution) == (1, 1), "generated or charged again"
    assert world.rows([execution])[execution.pending_id].status == "completed"
    assert REUSED_MESSAGE in world.run_log(child), "the re-executed run does not say why it did nothing"


def test_failed_run_reexecuted_from_failure_twice(world, report):
    """The model is refused, the operator fixes it and clicks "re-execute from failure" twice on
    the failed run: the execution is generated and billed once."""
    world.main_api.denied_models.add("gpt-4o-mini")
    [execution] = world.burst(1)
    world.wait([execution], 180)
    row = world.rows([execution])[execution.pending_id]
    assert row.status == "failed", row.status
    world.main_api.denied_models.clear()
    statuses = []
    started = time.monotonic()
    for _ in range(2):
        child = world.reexecute(row.dagster_run_id, "FROM_FAILURE")
        statuses.append(world.wait_run(child))
    drain = world.wait([execution], 60, started)
    outcome = report(world.outcome("failed run re-executed from failure twice", [execution], drain))
    assert statuses == ["SUCCESS", "SUCCESS"], statuses
    assert _generations_and_charges(world, execution) == (1, 1), "generated or charged twice"
    assert world.rows([execution])[execution.pending_id].status == "completed"
    assert outcome.unnotified == 0
