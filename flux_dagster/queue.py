"""The ``pending_executions`` queue (design §3): enqueue, claim with per-user fairness, and the
status transitions that make every row end exactly once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from flux_dagster.db.models import TERMINAL_STATUSES, PendingExecution, utcnow
from flux_dagster.errors import bounded
from flux_dagster.execution import ExecutionRequest

KINDS = ("node", "agent", "delivery")


def enqueue(session: Session, **fields: Any) -> PendingExecution:
    row = PendingExecution(**fields)
    session.add(row)
    session.flush()
    return row


def _launchable(now, relaunch_after: timedelta):
    return or_(
        PendingExecution.status == "pending",
        and_(PendingExecution.status == "launched", PendingExecution.launched_at < now - relaunch_after),
    )


def has_launchable(session: Session, relaunch_after: timedelta) -> bool:
    """Whether ``claim_batch`` would find a row: one cheap indexed look, for the sensor's long poll."""
    return session.scalar(select(PendingExecution.id).where(_launchable(utcnow(), relaunch_after)).limit(1)) is not None


def claim_batch(session: Session, limit: int, relaunch_after: timedelta,
                stale_ids: set[int] | None = None) -> list[PendingExecution]:
    """Pick up to ``limit`` rows to launch and mark them ``launched``.

    Order: the per-user rank first (each user's best row, then each user's second best, …), so one
    user's backlog cannot starve another's; then priority, then age. Rows left ``launched`` longer
    than ``relaunch_after`` without a run starting are offered again: the run key makes that safe;
    their ids go into ``stale_ids`` when given. Rows another claimer holds are skipped (Postgres).
    """
    now = utcnow()
    launchable = _launchable(now, relaunch_after)
    # Bound the window to the head of the queue so a 10,000-row backlog stays cheap to rank.
    head = (
        select(PendingExecution.id, PendingExecution.user_id, PendingExecution.priority)
        .where(launchable)
        .order_by(PendingExecution.priority.desc(), PendingExecution.id)
        .limit(limit * 20)
        .subquery()
    )
    user_rank = func.row_number().over(
        partition_by=head.c.user_id, order_by=(head.c.priority.desc(), head.c.id)
    )
    ranked = select(head.c.id, user_rank.label("user_rank"), head.c.priority).subquery()
    ids = session.scalars(
        select(ranked.c.id).order_by(ranked.c.user_rank, ranked.c.priority.desc(), ranked.c.id).limit(limit)
    ).all()
    if not ids:
        return []
    rows = session.scalars(
        select(PendingExecution).where(PendingExecution.id.in_(ids), launchable).with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        if stale_ids is not None and row.status == "launched":
            stale_ids.add(row.id)
        row.status = "launched"
        row.launched_at = now
    order = {id_: i for i, id_ in enumerate(ids)}
    return sorted(rows, key=lambda r: order[r.id])


def malformed_reason(row: PendingExecution) -> str | None:
    """Why a row cannot become a run at all, or None."""
    if row.kind not in KINDS:
        return f"Unknown execution kind {row.kind!r}: expected one of {', '.join(KINDS)}."
    missing = [name for name in ("exec_id", "flow_id", "user_id") if not getattr(row, name)]
    if row.kind == "node" and not row.node_id:
        missing.append("node_id")
    if row.kind == "delivery" and not row.payload:
        missing.append("payload (the delivery plan)")
    if missing:
        return f"Execution row is missing {', '.join(missing)}."
    return None


def request_of(row: PendingExecution) -> ExecutionRequest:
    return ExecutionRequest(
        exec_id=row.exec_id,
        flow_id=row.flow_id,
        user_id=row.user_id,
        node_id=row.node_id,
        session_id=row.session_id,
        flow_version_history_id=row.flow_version_history_id,
        run_id=row.run_id,
        pending_execution_id=row.id,
        kind=row.kind,
        socket_id=row.socket_id,
    )


def mark_running(session: Session, pending_id: int, dagster_run_id: str) -> PendingExecution | None:
    row = session.get(PendingExecution, pending_id, with_for_update=True)
    if row is None:
        return None
    row.status = "running"
    row.dagster_run_id = dagster_run_id
    row.started_at = row.started_at or utcnow()
    row.attempts = (row.attempts or 0) + 1
    row.error = None
    return row


def finish(session: Session, pending_id: int, dagster_run_id: str, status: str, error: str | None = None) -> bool:
    """Move a row to a terminal status, once per Dagster run.

    Returns False when this run already finished the row, so the error path (log, FAILED
    notification) runs once even when both the failure hook and the run-failure sensor see it.
    A re-execution is a new Dagster run, so it may finish the row again.
    """
    assert status in TERMINAL_STATUSES
    error = bounded(error) if error else error
    result = session.execute(
        update(PendingExecution)
        .where(
            PendingExecution.id == pending_id,
            ~and_(
                PendingExecution.status.in_(TERMINAL_STATUSES),
                PendingExecution.dagster_run_id == dagster_run_id,
            ),
        )
        .values(status=status, dagster_run_id=dagster_run_id, error=error, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def cancel_requested_runs(session: Session) -> tuple[list[str], list[int]]:
    """Executions cancelled after their run was requested: the Dagster runs of running ones, and
    the ids of ``launched`` ones (their run is queued or starting; found by its tag)."""
    rows = session.execute(
        select(PendingExecution.id, PendingExecution.status, PendingExecution.dagster_run_id, PendingExecution.kind)
        .where(PendingExecution.status.in_(("launched", "running")), PendingExecution.cancel_requested_at.is_not(None))
    ).all()
    # A running agent stops cooperatively: its nodes check the cancellation before they start.
    running = [run_id for _, status, run_id, kind in rows if status == "running" and run_id and kind != "agent"]
    launched = [id_ for id_, status, _, _ in rows if status == "launched"]
    return running, launched


def fail_unlaunchable(session: Session, row: PendingExecution, reason: str, status: str = "failed") -> None:
    """End a row that never gets a run (malformed, or cancelled while queued)."""
    row.status = status
    row.error = bounded(reason)
    row.finished_at = utcnow()


def queue_summary(session: Session) -> dict[str, int]:
    return dict(session.execute(select(PendingExecution.status, func.count()).group_by(PendingExecution.status)).all())
