"""``pending_executions_sensor``: turns queued rows into runs, exactly one per row (run_key)."""


import os
from datetime import timedelta

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SkipReason, sensor
from sqlalchemy import select

from flux_dagster import queue
from flux_dagster.db.models import FlowNode, PendingExecution
from flux_dagster.jobs.process_agent import process_agent
from flux_dagster.jobs.process_single_node import process_single_node
from flux_dagster.ops.lifecycle import PENDING_EXECUTION_TAG
from flux_dagster.resources import AppDatabase, NotifierResource

BATCH_SIZE = int(os.environ.get("FLUX_SENSOR_BATCH_SIZE", "50"))
RELAUNCH_AFTER = timedelta(seconds=int(os.environ.get("FLUX_RELAUNCH_AFTER_S", "120")))


def run_key(row: PendingExecution) -> str:
    return f"pending-execution-{row.id}"


def run_request_for(row: PendingExecution, node_type: str | None) -> RunRequest:
    """A node row runs ``process_single_node``, an agent row ``process_agent``."""
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
    }
    if row.kind == "agent":
        job_name, first_op = process_agent.name, "load_flow"
        tags.update({"flux/node_type": "agent", "flux/run_id": row.run_id or ""})
    else:
        job_name, first_op = process_single_node.name, "notify_status_pending"
        config["node_id"] = row.node_id
    return RunRequest(run_key=run_key(row), job_name=job_name,
                      run_config={"ops": {first_op: {"config": config}}}, tags=tags)


@sensor(
    jobs=[process_single_node, process_agent],
    minimum_interval_seconds=1,
    default_status=DefaultSensorStatus.RUNNING,
)
def pending_executions_sensor(context: SensorEvaluationContext, app_db: AppDatabase, notifier: NotifierResource):
    """A bounded, per-user-fair batch each tick; malformed rows fail alone with a clear error."""
    requests: list[RunRequest] = []
    failed: list[tuple[PendingExecution, str]] = []
    with app_db.session() as session:
        rows = queue.claim_batch(session, BATCH_SIZE, RELAUNCH_AFTER)
        node_types = dict(
            session.execute(
                select(FlowNode.nodeId, FlowNode.type).where(
                    FlowNode.nodeId.in_([r.node_id for r in rows if r.node_id])
                )
            ).all()
        ) if rows else {}
        for row in rows:
            if row.cancel_requested_at is not None:
                queue.fail_unlaunchable(session, row, "Cancelled before it started.", status="cancelled")
                continue
            reason = queue.malformed_reason(row)
            if reason:
                queue.fail_unlaunchable(session, row, reason)
                failed.append((row, reason))
                continue
            requests.append(run_request_for(row, node_types.get(row.node_id)))
    for row, reason in failed:
        context.log.warning(f"pending execution {row.id} failed without a run: {reason}")
        if row.user_id and row.flow_id:
            notifier.client().publish(queue.request_of(row), row.node_id or "", "FAILED", reason)
    if not requests:
        return SkipReason("No pending executions." if not failed else f"{len(failed)} malformed row(s) failed.")
    return requests
