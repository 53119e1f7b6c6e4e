"""What one execution is, and the per-node bookkeeping every job shares.

Plain functions over a SQLAlchemy session: ``process_single_node`` and ``process_agent`` both go
through these, so a node's rows look the same whichever job ran it.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import (
    ExecutionLog, FlowEdge, FlowNode, FlowVersionHistory, NodeExecution, PendingExecution, utcnow,
)
from flux_dagster.errors import FluxError, UserConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionRequest:
    """The original workflow parameters of one execution (a ``pending_executions`` row)."""

    exec_id: str
    flow_id: str
    user_id: str
    node_id: str | None = None
    session_id: str | None = None
    flow_version_history_id: str | None = None
    run_id: str | None = None
    pending_execution_id: int | None = None
    kind: str = "node"
    duplicate_of: str | None = None  # another run is executing this row: this one does nothing
    socket_id: str | None = None  # the client socket that receives the streamed answer


@dataclass(frozen=True)
class NodeTask:
    """A node loaded for execution: the request plus the node's row."""

    request: ExecutionRequest
    node_id: str
    node_type: str
    data: dict[str, Any]

    @property
    def label(self) -> str | None:
        return self.data.get("label") or self.data.get("title")


@dataclass(frozen=True)
class NodeOutcome:
    """What a node branch hands to the success log and the COMPLETED notification."""

    task: NodeTask
    output: Any
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowEdgeRow:
    source: str
    target: str
    source_handle: str | None
    target_handle: str | None


def _snapshot(session: Session, request: ExecutionRequest) -> FlowVersionHistory:
    snapshot = session.get(FlowVersionHistory, request.flow_version_history_id)
    if snapshot is None or snapshot.flowId != request.flow_id:
        raise UserConfigError(f"Version {request.flow_version_history_id} of flow {request.flow_id} does not exist.")
    return snapshot


def read_nodes(session: Session, request: ExecutionRequest,
               node_ids: list[str] | None = None) -> dict[str, tuple[str, Any]]:
    """The flow's nodes as ``{nodeId: (type, data)}`` (all, or ``node_ids``), in the flow's order:
    from the published version the execution names (``flow_version_history_id``), never the
    working copy; else from the working copy (``flows_nodes``)."""
    if request.flow_version_history_id:
        wanted = None if node_ids is None else set(node_ids)
        return {n["nodeId"]: (n.get("type"), n.get("data"))
                for n in _snapshot(session, request).nodes or []
                if isinstance(n, dict) and n.get("nodeId") and (wanted is None or n["nodeId"] in wanted)}
    query = select(FlowNode).where(FlowNode.flowId == request.flow_id)
    if node_ids is not None:
        query = query.where(FlowNode.nodeId.in_(node_ids))
    return {n.nodeId: (n.type, n.data) for n in session.scalars(query)}


def read_edges(session: Session, request: ExecutionRequest) -> list[FlowEdgeRow]:
    """The flow's edges, by ``edgeId``, from the same source as ``read_nodes``."""
    if request.flow_version_history_id:
        rows = sorted((e for e in _snapshot(session, request).edges or [] if isinstance(e, dict)),
                      key=lambda e: str(e.get("edgeId", "")))
        return [FlowEdgeRow(str(e.get("source")), str(e.get("target")), e.get("sourceHandle"), e.get("targetHandle"))
                for e in rows]
    return [FlowEdgeRow(e.source, e.target, e.sourceHandle, e.targetHandle)
            for e in session.scalars(select(FlowEdge).where(FlowEdge.flowId == request.flow_id).order_by(FlowEdge.edgeId))]


def node_data(node_id: str, data: Any) -> dict[str, Any]:
    """A node's ``data`` as a JSON object, with a clear error when it is not one."""
    if isinstance(data, str):  # some rows carry JSON text instead of a JSON object
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise UserConfigError(f"Node {node_id} has malformed data: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserConfigError(f"Node {node_id} has malformed data: expected a JSON object.")
    return data


def load_node(session: Session, request: ExecutionRequest, node_id: str) -> NodeTask:
    """``getInfoInDatabase``: the node's type and data, with clear errors for what can't run."""
    node = read_nodes(session, request, [node_id]).get(node_id)
    if node is None:
        if request.flow_version_history_id:
            raise UserConfigError(f"Node {node_id} is not in version {request.flow_version_history_id} "
                                  f"of flow {request.flow_id}.")
        raise UserConfigError(f"Node {node_id} was not found in flow {request.flow_id}.")
    node_type, data = node
    return NodeTask(request=request, node_id=node_id, node_type=node_type, data=node_data(node_id, data))


def cancel_requested(session: Session, pending_id: int | None) -> bool:
    if pending_id is None:
        return False
    row = session.get(PendingExecution, pending_id)
    return row is not None and row.cancel_requested_at is not None


def cancellation_check(database_url: str, pending_id: int | None, interval_s: float = 0.5) -> Callable[[], bool]:
    """A cheap "was this execution cancelled?" for long work to ask often: it reads
    ``cancel_requested_at`` at most every ``interval_s``, and stays true once it saw it."""
    last_read, seen = [float("-inf")], [False]

    def cancelled() -> bool:
        if seen[0] or pending_id is None or time.monotonic() - last_read[0] < interval_s:
            return seen[0]
        last_read[0] = time.monotonic()
        try:
            with session_scope(database_url) as session:
                seen[0] = cancel_requested(session, pending_id)
        except SQLAlchemyError:  # the work goes on; the next read may see it
            log.warning("Could not read the cancellation of execution %s", pending_id, exc_info=True)
        return seen[0]

    return cancelled


def merge_node_data(session: Session, task: NodeTask, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into ``flows_nodes.data`` (the legacy reload path reads it)."""
    node = session.scalar(
        select(FlowNode)
        .where(FlowNode.flowId == task.request.flow_id, FlowNode.nodeId == task.node_id)
        .with_for_update()
    )
    if node is None:
        if task.request.flow_version_history_id:
            return updates  # a published node the working copy no longer has: node_executions keeps it
        raise UserConfigError(f"Node {task.node_id} was deleted while it ran.")
    current = node.data if isinstance(node.data, dict) else {}
    node.data = {**current, **updates}
    return node.data


def _node_execution(session: Session, task: NodeTask) -> NodeExecution:
    """The own row of this (execId, nodeId): created if the main API did not create it."""
    row = session.scalar(
        select(NodeExecution).where(
            NodeExecution.execId == task.request.exec_id, NodeExecution.nodeId == task.node_id
        )
    )
    if row is None:
        row = NodeExecution(
            execId=task.request.exec_id,
            flowId=task.request.flow_id,
            nodeId=task.node_id,
            type=task.node_type,
            userId=task.request.user_id,
            sessionId=task.request.session_id,
            flowVersionHistoryId=task.request.flow_version_history_id,
        )
        session.add(row)
    return row


def start_node_execution(session: Session, task: NodeTask, dagster_run_id: str) -> None:
    row = _node_execution(session, task)
    if row.status == "COMPLETED":
        return  # an earlier run completed it: the node's stages reuse that output (see ops/guards.py)
    row.type = task.node_type or row.type
    row.input = row.input or task.data
    row.status = "RUNNING"
    row.isError = False
    row.metadata_ = {
        **(row.metadata_ or {}),
        "startedAt": utcnow().isoformat(),
        "runType": "agent" if task.request.kind == "agent" else "single-node",
        "dagsterRunId": dagster_run_id,
        "runId": task.request.run_id or "",
    }


def _persist_output(session: Session, task: NodeTask, node_updates: dict[str, Any], output_data: dict[str, Any],
                    output: str | None, output_type: str, metadata: dict[str, Any] | None, status: str) -> NodeExecution:
    merge_node_data(session, task, node_updates)
    row = _node_execution(session, task)
    row.outputData = output_data
    row.output = output
    row.outputType = output_type
    row.metadata_ = {**(row.metadata_ or {}), **(metadata or {}), "finishedAt": utcnow().isoformat()}
    row.isError = False
    row.status = status
    return row


def persist_node_success(
    session: Session,
    task: NodeTask,
    *,
    data_updates: dict[str, Any],
    output: str | None,
    output_type: str,
    metadata: dict[str, Any] | None = None,
) -> None:
    """``persistNodeSuccess``: replace the execution's output, merge the same into the node."""
    updates = {**data_updates, "executionStatus": "COMPLETED", "errorMessage": None, "errorStatusCode": None}
    _persist_output(session, task, updates, data_updates, output, output_type, metadata, "COMPLETED")


def persist_node_cancelled(session: Session, task: NodeTask, data_updates: dict[str, Any], output: str | None,
                           output_type: str, metadata: dict[str, Any] | None = None) -> None:
    """A node stopped by a cancellation keeps what it produced (reference §2.1 cancellation path):
    merged with ``partialOutput: true`` and ``executionStatus: CANCELLED``, ``cancelledAt`` stamped."""
    updates = {**data_updates, "executionStatus": "CANCELLED", "partialOutput": True}
    row = _persist_output(session, task, updates, updates, output, output_type, metadata, "CANCELLED")
    row.cancelledAt = utcnow()


def record_node_error(session: Session, request: ExecutionRequest, node_id: str, task: NodeTask | None,
                      error: FluxError, stack: str) -> None:
    """``nodeExecutionError``: the execution row says FAILED with the user message, and so does the
    node when it could be loaded (``task``); a node whose data is unreadable still gets its row ended."""
    if task is not None:
        merge_node_data(
            session,
            task,
            {"executionStatus": "FAILED", "errorMessage": error.user_message,
             "errorStatusCode": getattr(error, "status_code", None)},
        )
    row = _node_execution(session, task or NodeTask(request=request, node_id=node_id, node_type="", data={}))
    row.isError = True
    row.outputType = "error"
    row.output = error.user_message
    row.status = "FAILED"
    row.metadata_ = {**(row.metadata_ or {}), "stack": stack, "code": error.code,
                     "userMessage": error.user_message, "finishedAt": utcnow().isoformat()}


def completed_execution(session: Session, request: ExecutionRequest, node_id: str) -> NodeExecution | None:
    """The node's execution row when an earlier run of this execution already completed it:
    a re-execution reuses its output instead of generating (and charging) again."""
    row = session.scalar(
        select(NodeExecution).where(NodeExecution.execId == request.exec_id, NodeExecution.nodeId == node_id)
    )
    return row if row is not None and row.status == "COMPLETED" else None


def record_node_cancelled(
    session: Session, task: NodeTask, reason: str, *, dagster_run_id: str | None = None, not_executed: bool = False
) -> None:
    """CANCELLED: stopped by a cancellation, or (``not_executed``) never run because an upstream
    node did not complete; either way by ``dagster_run_id``, so a re-execution can tell it apart."""
    merge_node_data(session, task, {"executionStatus": "CANCELLED"})
    row = _node_execution(session, task)
    row.status = "CANCELLED"
    row.cancelledAt = utcnow()
    if not (row.outputData or {}).get("partialOutput"):  # a kept partial output stays the output
        row.output = reason
    row.metadata_ = {**(row.metadata_ or {}), "userMessage": reason, "notExecuted": not_executed,
                     **({"dagsterRunId": dagster_run_id} if dagster_run_id else {})}


def write_execution_log(
    session: Session,
    request: ExecutionRequest,
    node_id: str,
    *,
    message: str,
    metadata: dict[str, Any] | None,
    error_stack: str | None = None,
    is_error: bool = False,
) -> None:
    """``generateExecutionLogs``: one row in ``execution_logs``."""
    session.add(
        ExecutionLog(
            nodeId=node_id,
            flowId=request.flow_id,
            userId=request.user_id,
            sessionId=request.session_id,
            message=message,
            errorStack=error_stack,
            metadata_=metadata,
            isError=is_error,
        )
    )


def format_stack(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) or "No stack"
