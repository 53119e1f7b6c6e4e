"""What a node stage checks before anything with side effects (a provider call, a charge, a
request to a user's system): the execution was not cancelled meanwhile, and no earlier run of the
same execution already completed the node (a re-execution reuses that output: nothing is
generated or charged twice, whatever the operator re-executes)."""

from __future__ import annotations

from dagster import OpExecutionContext

from flux_dagster.db.models import NodeExecution
from flux_dagster.execution import NodeOutcome, NodeTask, cancel_requested, completed_execution
from flux_dagster.ops.retries import cancel_own_run
from flux_dagster.resources import AppDatabase

REUSED_MESSAGE = "Completed by an earlier run of this execution: its output is reused, not generated or charged again."


def running_elsewhere(context: OpExecutionContext, session, pending_id: int) -> str | None:
    """The id of another run already executing this row, when there is one still in progress:
    a second launch of the same row (a relaunch while the first was stuck in the queue, a UI
    re-execution of a running one) must not execute it twice. Call with the row locked."""
    from flux_dagster.db.models import PendingExecution

    row = session.get(PendingExecution, pending_id, with_for_update=True)
    other = row.dagster_run_id if row is not None and row.status == "running" else None
    if other in (None, context.run_id):
        return None
    run = context.instance.get_run_by_id(other)
    return other if run is not None and not run.is_finished else None


def earlier_completion(context: OpExecutionContext, app_db: AppDatabase, task: NodeTask) -> NodeExecution | None:
    """Stops a cancelled execution; returns the node's execution row when an earlier run completed it."""
    with app_db.session() as session:
        if cancel_requested(session, task.request.pending_execution_id):
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
