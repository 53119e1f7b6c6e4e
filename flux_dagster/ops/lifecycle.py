"""The ops every node execution goes through, whatever its type."""

from dataclasses import replace

from dagster import Config, HookContext, OpExecutionContext, Out, Output, failure_hook, op

from flux_dagster import queue
from flux_dagster.errors import UserConfigError
from flux_dagster.execution import ExecutionRequest, NodeOutcome, NodeTask, load_node, start_node_execution, write_execution_log
from flux_dagster.failures import cancel_execution, fail_execution
from flux_dagster.node_types import NODE_TYPES
from flux_dagster.ops.guards import running_elsewhere
from flux_dagster.ops.retries import CANCELLED_MESSAGE, RETRY_POLICIES, cancel_own_run, error_of, node_errors, was_interrupted
from flux_dagster.resources import AppDatabase, NotifierResource

# Stored node type → the branch (op) that runs it; a type missing there fails with a clear message.
NODE_BRANCHES: dict[str, str] = {node_type: spec.branch for node_type, spec in NODE_TYPES.items()}

PENDING_EXECUTION_TAG = "flux/pending_execution_id"


class ExecutionParams(Config):
    """An execution's workflow parameters, set by the sensor from the ``pending_executions`` row
    (an agent execution's: the flow, no node)."""

    pending_execution_id: int
    exec_id: str
    flow_id: str
    user_id: str
    session_id: str | None = None
    flow_version_history_id: str | None = None
    run_id: str | None = None
    socket_id: str | None = None


class ExecutionConfig(ExecutionParams):
    """A node execution's parameters."""

    node_id: str


@op(retry_policy=RETRY_POLICIES["notify_status"])
def notify_status_pending(
    context: OpExecutionContext, config: ExecutionConfig, app_db: AppDatabase, notifier: NotifierResource
) -> ExecutionRequest:
    """``notifyStatus`` PENDING, and the row becomes ``running`` under this run — unless it was
    cancelled while its run waited to start: then the run ends CANCELED before any work."""
    request = ExecutionRequest(kind="node", **config.model_dump())
    with node_errors():
        with app_db.session() as session:
            if (other := running_elsewhere(context, session, config.pending_execution_id)) is not None:
                context.log.warning(f"Run {other} is already executing this execution: this run does nothing.")
                return replace(request, duplicate_of=other)
            row = queue.mark_running(session, config.pending_execution_id, context.run_id)
            if row is not None and row.cancel_requested_at is not None:
                cancel_own_run(context)
        notifier.client().publish(request, config.node_id, "PENDING")
    return request


@op(
    out={branch: Out(NodeTask, is_required=False) for branch in sorted(set(NODE_BRANCHES.values()))},
    retry_policy=RETRY_POLICIES["get_info_in_database"],
)
def get_info_in_database(context: OpExecutionContext, request: ExecutionRequest, app_db: AppDatabase):
    """``getInfoInDatabase``: load the node and take the branch of its type (none at all for a
    duplicate launch: every later step is skipped)."""
    if request.duplicate_of:
        return
    with node_errors():
        with app_db.session() as session:
            task = load_node(session, request, request.node_id)
            branch = NODE_BRANCHES.get(task.node_type)
            if branch is None:
                raise UserConfigError(f"Node type {task.node_type!r} is not supported by this worker.")
            start_node_execution(session, task, context.run_id)
    yield Output(task, output_name=branch)


@op(retry_policy=RETRY_POLICIES["generate_execution_logs"])
def generate_execution_logs(outcomes: list[NodeOutcome], app_db: AppDatabase) -> NodeOutcome:
    """``generateExecutionLogs``: the success row, from whichever branch ran."""
    outcome = outcomes[0]
    with node_errors():
        with app_db.session() as session:
            write_execution_log(session, outcome.task.request, outcome.task.node_id,
                                message=outcome.message, metadata=outcome.task.data)
    return outcome


@op(retry_policy=RETRY_POLICIES["notify_status"])
def notify_status_completed(
    context: OpExecutionContext, outcome: NodeOutcome, app_db: AppDatabase, notifier: NotifierResource
) -> None:
    """``notifyStatus`` COMPLETED, and the row ends ``completed``."""
    request = outcome.task.request
    with node_errors():
        notifier.client().publish(request, outcome.task.node_id, "COMPLETED")
        with app_db.session() as session:
            queue.finish(session, request.pending_execution_id, context.run_id, "completed")


@failure_hook(required_resource_keys={"app_db", "notifier"})
def node_execution_error(context: HookContext) -> None:
    """The error path, once per failed execution: runs on the step's final failure only, after
    its retries (a retried attempt is not a failure), in the run itself."""
    run = context.instance.get_run_by_id(context.run_id)
    pending_id = run.tags.get(PENDING_EXECUTION_TAG) if run else None
    if pending_id is None:
        return
    from flux_dagster.execution import format_stack

    exc = context.op_exception
    if was_interrupted(exc):  # terminated (UI, or cancel_requested_at): cancelled, not failed
        cancel_execution(context.resources.app_db.url, context.resources.notifier.client(), int(pending_id),
                         context.run_id, CANCELLED_MESSAGE)
        return
    error = error_of(exc)
    failed = fail_execution(
        context.resources.app_db.url, context.resources.notifier.client(), int(pending_id), context.run_id,
        error, format_stack(exc) if exc else "No stack",
    )
    if failed:
        context.log.error(f"Execution failed: {error.user_message}")
