"""The error path (reference §2.1): error log with the stack → node_execution_error → FAILED
notification, once per failed execution whichever part of the worker noticed the failure."""

from __future__ import annotations

import logging

from flux_dagster import queue
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster.errors import FluxError
from flux_dagster.execution import (
    ExecutionRequest, NodeTask, load_node, record_node_cancelled, record_node_error, write_execution_log,
)
from flux_dagster.services.notifications import Notifier

log = logging.getLogger(__name__)


def fail_node(session, request: ExecutionRequest, node_id: str, task: NodeTask | None, error: FluxError, stack: str) -> None:
    """Error log and node_execution_error for one node, in the caller's transaction."""
    write_execution_log(
        session, request, node_id, message=error.user_message, error_stack=stack,
        metadata=task.data if task else None, is_error=True,
    )
    if node_id:
        record_node_error(session, request, node_id, task, error, stack)


def fail_execution(
    database_url: str, notifier: Notifier, pending_id: int, dagster_run_id: str, error: FluxError, stack: str
) -> bool:
    """Fail a node execution row; returns False when this run already finished it."""
    with session_scope(database_url) as session:
        row = session.get(PendingExecution, pending_id)
        if row is None or not queue.finish(session, pending_id, dagster_run_id, "failed", error.user_message):
            return False
        request = queue.request_of(row)
        node_id = row.node_id or ""
        task = None
        if row.node_id:
            try:
                task = load_node(session, request, row.node_id)
            except FluxError:
                task = None  # the node itself is what went missing: still log and notify
        fail_node(session, request, node_id, task, error, stack)
    if request.kind == "delivery":  # no node status to show: the row and the error log say it
        return True
    try:
        notifier.publish(request, node_id, "FAILED", error.user_message)
    except Exception:  # the row is failed and logged; a lost notification must not hide that
        log.exception("FAILED notification for execution %s could not be sent", request.exec_id)
    return True


def cancel_execution(database_url: str, notifier: Notifier, pending_id: int, dagster_run_id: str, reason: str) -> bool:
    """A run terminated from the UI (or cancelled before its node ran): the row and node say CANCELLED."""
    with session_scope(database_url) as session:
        row = session.get(PendingExecution, pending_id)
        if row is None or not queue.finish(session, pending_id, dagster_run_id, "cancelled", reason):
            return False
        request = queue.request_of(row)
        if row.node_id:
            try:
                record_node_cancelled(session, load_node(session, request, row.node_id), reason)
            except FluxError:
                pass  # nothing to mark on a node that does not exist
    if request.kind == "delivery":
        return True
    try:
        notifier.publish(request, row.node_id or "", "CANCELLED", reason)
    except Exception:
        log.exception("CANCELLED notification for execution %s could not be sent", request.exec_id)
    return True
