"""``pending_executions_sensor``: turns queued rows into runs, exactly one per row (run_key).

Dagster's sensor daemon evaluates sensors at most every 5 s (its loop floor). So that a row does
not wait for the next loop, an evaluation long-polls: it returns as soon as a launchable row
appears, or after ``LONG_POLL_S``. One evaluation per sensor can be in flight, and it returns once,
so ``SHARDS`` identical sensors take turns (one polls at a time in the code server) and each loop
can start up to ``SHARDS`` batches without delay. Rows are claimed only while Dagster's run queue
holds fewer than ``MAX_QUEUED_RUNS`` runs, so a backlog waits here, not in the run queue.
``FLUX_SENSOR_LONG_POLL_S=0``, ``FLUX_SENSOR_SHARDS=1`` and ``FLUX_SENSOR_MAX_QUEUED_RUNS=0`` give
back Dagster's plain cadence. See docs/performance.md.
"""


import os
import threading
import time
from datetime import timedelta

from dagster import (
    DagsterInvariantViolationError,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from sqlalchemy import select, tuple_

from flux_dagster import queue
from flux_dagster.db.models import FlowNode, PendingExecution
from flux_dagster.jobs.deliver_run_outputs import deliver_run_outputs
from flux_dagster.jobs.process_agent import process_agent
from flux_dagster.jobs.process_single_node import process_single_node
from flux_dagster.ops.lifecycle import PENDING_EXECUTION_TAG
from flux_dagster.resources import AppDatabase, NotifierResource

BATCH_SIZE = int(os.environ.get("FLUX_SENSOR_BATCH_SIZE", "50"))
RELAUNCH_AFTER = timedelta(seconds=int(os.environ.get("FLUX_RELAUNCH_AFTER_S", "120")))
# Just under the daemon's 5 s loop, so an evaluation is over before the loop submits the next one.
LONG_POLL_S = float(os.environ.get("FLUX_SENSOR_LONG_POLL_S", "4.5"))
POLL_INTERVAL_S = float(os.environ.get("FLUX_SENSOR_POLL_INTERVAL_S", "0.05"))
SHARDS = max(1, int(os.environ.get("FLUX_SENSOR_SHARDS", "3")))
# Claim rows only while Dagster's run queue holds fewer QUEUED runs than this (0: no limit).
MAX_QUEUED_RUNS = int(os.environ.get("FLUX_SENSOR_MAX_QUEUED_RUNS", "32"))
QUEUE_FULL_POLL_S = 0.5
CANCELLED_BEFORE_START = "Cancelled before it started."

# One shard polls at a time; the others wait here to take over once it has returned its batch.
_polling = threading.Lock()


def run_key(row: PendingExecution) -> str:
    return f"pending-execution-{row.id}"


def run_request_for(row: PendingExecution, node_type: str | None) -> RunRequest:
    """A node row runs ``process_single_node``, an agent row ``process_agent``, a delivery row
    ``deliver_run_outputs`` (its plan stays in the row: recipients never enter run config)."""
    tags = {
        PENDING_EXECUTION_TAG: str(row.id),
        "flux/exec_id": row.exec_id,
        "flux/flow_id": row.flow_id,
        "flux/node_id": row.node_id or "",
        "flux/user_id": row.user_id,
        "flux/node_type": node_type or "unknown",
        "dagster/priority": str(row.priority or 0),
    }
    config = {
        "pending_execution_id": row.id, "exec_id": row.exec_id, "flow_id": row.flow_id, "user_id": row.user_id,
        "session_id": row.session_id, "flow_version_history_id": row.flow_version_history_id, "run_id": row.run_id,
        "socket_id": row.socket_id,
    }
    if row.kind == "agent":
        job_name, first_op = process_agent.name, "load_flow"
        tags.update({"flux/node_type": "agent", "flux/run_id": row.run_id or ""})
    elif row.kind == "delivery":
        job_name, first_op = deliver_run_outputs.name, "load_delivery_plan"
        tags.update({"flux/node_type": "delivery", "flux/run_id": row.run_id or ""})
    else:
        job_name, first_op = process_single_node.name, "notify_status_pending"
        config["node_id"] = row.node_id
    return RunRequest(run_key=run_key(row), job_name=job_name,
                      run_config={"ops": {first_op: {"config": config}}}, tags=tags)


def _without_existing_runs(context: SensorEvaluationContext, rows: list[PendingExecution],
                           stale_ids: set[int]) -> list[PendingExecution]:
    """A row offered again (stale ``launched``) may already have a run that another shard
    requested: run keys are per sensor, so look for its run by tag."""
    if SHARDS == 1 or not stale_ids:
        return rows
    existing = context.instance.get_run_records(RunsFilter(tags={PENDING_EXECUTION_TAG: [str(i) for i in stale_ids]}))
    started = {record.dagster_run.tags.get(PENDING_EXECUTION_TAG) for record in existing}
    return [r for r in rows if str(r.id) not in started]


def _room_in_run_queue(context: SensorEvaluationContext) -> int:
    """How many rows to claim now. A backlog waits in pending_executions (cheap, and fair at claim
    time) rather than as thousands of QUEUED runs, which the run queue daemon rescans every second."""
    if MAX_QUEUED_RUNS <= 0:
        return BATCH_SIZE
    try:
        queued = context.instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
    except DagsterInvariantViolationError:  # a test context without an instance
        return BATCH_SIZE
    return max(0, min(BATCH_SIZE, MAX_QUEUED_RUNS - queued))


def _claim(context: SensorEvaluationContext, app_db: AppDatabase, notifier: NotifierResource, limit: int):
    """A bounded, per-user-fair batch; malformed rows fail alone with a clear error."""
    requests: list[RunRequest] = []
    ended: list[tuple[PendingExecution, str, str]] = []  # (row, status to notify, why)
    with app_db.session() as session:
        stale_ids: set[int] = set()
        rows = queue.claim_batch(session, limit, RELAUNCH_AFTER, stale_ids) if limit else []
        rows = _without_existing_runs(context, rows, stale_ids)
        node_types = {
            (flow_id, node_id): node_type
            for flow_id, node_id, node_type in session.execute(
                select(FlowNode.flowId, FlowNode.nodeId, FlowNode.type).where(
                    tuple_(FlowNode.flowId, FlowNode.nodeId).in_([(r.flow_id, r.node_id) for r in rows if r.node_id])
                )
            )
        } if rows else {}
        to_terminate, launched_cancelled = queue.cancel_requested_runs(session)
        for row in rows:
            if row.cancel_requested_at is not None:
                queue.fail_unlaunchable(session, row, CANCELLED_BEFORE_START, status="cancelled")
                ended.append((row, "CANCELLED", CANCELLED_BEFORE_START))
                continue
            reason = queue.malformed_reason(row)
            if reason:
                queue.fail_unlaunchable(session, row, reason)
                ended.append((row, "FAILED", reason))
                continue
            requests.append(run_request_for(row, node_types.get((row.flow_id, row.node_id))))
    _cancel_runs(context, to_terminate, launched_cancelled)
    for row, status, reason in ended:
        context.log.warning(f"pending execution {row.id} ended {status} without a run: {reason}")
        if row.user_id and row.flow_id:
            notifier.client().publish(queue.request_of(row), row.node_id or "", status, reason)
    if not requests:
        return SkipReason("No pending executions." if not ended else f"{len(ended)} row(s) ended without a run.")
    return requests


def _cancel_runs(context: SensorEvaluationContext, run_ids: list[str], launched_ids: list[int]) -> None:
    """Runs of cancelled executions: a queued run is dropped before it starts, a started one is
    terminated — the same path as "Terminate" in the UI; the run-canceled sensor (or the run's own
    failure hook) then ends the row once."""
    runs = [r for r in (context.instance.get_run_by_id(i) for i in run_ids) if r is not None]
    if launched_ids:
        runs += context.instance.get_runs(RunsFilter(tags={PENDING_EXECUTION_TAG: [str(i) for i in launched_ids]}))
    for run in runs:
        if not run.is_finished and run.status != DagsterRunStatus.CANCELING:
            context.log.info(f"cancelling run {run.run_id}: its execution was cancelled")
            context.instance.run_coordinator.cancel_run(run.run_id)


def _evaluate(context: SensorEvaluationContext, app_db: AppDatabase, notifier: NotifierResource):
    if LONG_POLL_S <= 0:
        return _claim(context, app_db, notifier, _room_in_run_queue(context))
    deadline = time.monotonic() + LONG_POLL_S
    if not _polling.acquire(timeout=LONG_POLL_S):
        return SkipReason("Another shard was polling the queue.")
    try:
        room, waiting = 0, False
        while time.monotonic() < deadline:
            with app_db.session() as session:
                waiting = queue.has_launchable(session, RELAUNCH_AFTER)
            if waiting:
                room = _room_in_run_queue(context)
                if room:
                    break
            time.sleep(QUEUE_FULL_POLL_S if waiting else POLL_INTERVAL_S)
        result = _claim(context, app_db, notifier, room)
        if waiting and not room and isinstance(result, SkipReason):
            return SkipReason(f"Dagster's run queue holds {MAX_QUEUED_RUNS} runs: rows wait in pending_executions.")
        return result
    finally:
        _polling.release()


def _shard(name: str) -> SensorDefinition:
    @sensor(
        name=name,
        jobs=[process_single_node, process_agent, deliver_run_outputs],
        minimum_interval_seconds=1,
        default_status=DefaultSensorStatus.RUNNING,
        description="Turns pending_executions rows into runs; long-polls the queue (see module doc).",
    )
    def _pending_executions(context: SensorEvaluationContext, app_db: AppDatabase, notifier: NotifierResource):
        return _evaluate(context, app_db, notifier)

    return _pending_executions


pending_executions_sensors = [
    _shard("pending_executions_sensor" if i == 0 else f"pending_executions_sensor_{i}") for i in range(SHARDS)
]
pending_executions_sensor = pending_executions_sensors[0]
