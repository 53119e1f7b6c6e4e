"""What a node stage checks before anything with side effects (a provider call, a charge, a
request to a user's system): the execution was not cancelled meanwhile, and no earlier run of the
same execution already completed the node (a re-execution reuses that output: nothing is
generated or charged twice, whatever the operator re-executes)."""

from __future__ import annotations

from dagster import DagsterRunStatus, Failure, OpExecutionContext
from dagster._core.errors import DagsterExecutionInterruptedError

from flux_dagster import queue
from flux_dagster.db.models import NodeExecution
from flux_dagster.execution import NodeOutcome, NodeTask, completed_execution
from flux_dagster.ops.retries import CANCELLED_MESSAGE
from flux_dagster.resources import AppDatabase

REUSED_MESSAGE = "Completed by an earlier run of this execution: its output is reused, not generated or charged again."


def cancel_own_run(context: OpExecutionContext) -> None:
    """End this run as CANCELED, the way a termination would: the run is marked CANCELING and the
    step stops as interrupted (the failure hook then cancels the row once)."""
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and not run.is_finished and run.status != DagsterRunStatus.CANCELING:
        context.instance.report_run_canceling(run, message="Its execution was cancelled (cancel_requested_at).")
    raise Failure(description=CANCELLED_MESSAGE, allow_retries=False) from DagsterExecutionInterruptedError(
        "cancel requested"
    )


def earlier_completion(context: OpExecutionContext, app_db: AppDatabase, task: NodeTask) -> NodeExecution | None:
    """Stops a cancelled execution; returns the node's execution row when an earlier run completed it."""
    with app_db.session() as session:
        if queue.cancel_requested(session, task.request.pending_execution_id):
            cancel_own_run(context)
        row = completed_execution(session, task.request, task.node_id)
        if row is not None:
            session.expunge(row)
    if row is not None:
        context.log.info(f"Node {task.node_id} of execution {task.request.exec_id}: {REUSED_MESSAGE}")
    return row


def reused_outcome(task: NodeTask, row: NodeExecution) -> NodeOutcome:
    return NodeOutcome(task=task, output=row.outputData if row.outputData is not None else row.output,
                       message=REUSED_MESSAGE, extra={**(row.metadata_ or {}), "reused": True})
