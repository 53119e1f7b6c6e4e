"""Bulk reprocessing: queue again the executions that failed in a time window (design §6)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flux_dagster.db.models import PendingExecution

REQUEUE_FIELDS = ("kind", "exec_id", "flow_id", "node_id", "user_id", "session_id", "flow_version_history_id",
                  "run_id", "socket_id", "payload", "priority")


def requeue_failed(session: Session, start: datetime, end: datetime) -> list[int]:
    """A new ``pending`` row for each execution whose latest row failed in [start, end).

    A new row, not the old one reset: the old row keeps its run and error, and the new row gets its
    own run key. Executions already requeued (a newer row exists) are left alone, so running the
    same backfill twice queues nothing twice."""
    latest = select(func.max(PendingExecution.id)).group_by(PendingExecution.exec_id).scalar_subquery()
    failed = session.scalars(
        select(PendingExecution).where(
            PendingExecution.id.in_(latest),
            PendingExecution.status == "failed",
            PendingExecution.created_at >= start,
            PendingExecution.created_at < end,
        ).order_by(PendingExecution.id)
    ).all()
    return [requeue_row(session, row).id for row in failed]


def requeue_row(session: Session, row: PendingExecution) -> PendingExecution:
    """A new ``pending`` row for the same execution (its own run key)."""
    new = PendingExecution(**{name: getattr(row, name) for name in REQUEUE_FIELDS})
    session.add(new)
    session.flush()
    return new
