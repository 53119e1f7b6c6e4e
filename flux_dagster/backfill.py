"""Bulk reprocessing: queue again the executions that failed in a time window (design §6), and
running one execution's node(s) again on purpose, as a new execution."""

from __future__ import annotations

import uuid
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


def requeue_row(session: Session, row: PendingExecution, exec_id: str | None = None) -> PendingExecution:
    """A new ``pending`` row for the same execution (its own run key), or for a new one (``exec_id``)."""
    new = PendingExecution(**{name: getattr(row, name) for name in REQUEUE_FIELDS})
    new.exec_id = exec_id or new.exec_id
    session.add(new)
    session.flush()
    return new


def rerun(session: Session, exec_id: str) -> PendingExecution | None:
    """A new execution (new ``execId``) of what ``exec_id`` ran: generated and charged anew. A
    re-execution of the old one's runs never does that (its completed nodes are reused)."""
    row = session.scalars(
        select(PendingExecution).where(PendingExecution.exec_id == exec_id).order_by(PendingExecution.id.desc())
    ).first()
    return None if row is None else requeue_row(session, row, exec_id=str(uuid.uuid4()))
