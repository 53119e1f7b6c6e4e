"""Bounded history: delete what is older than the retention window, in batches.

Dagster keeps every run forever (it has no run retention), and each execution is a run with ~86
events. ``purge_history`` deletes finished runs last updated before the cutoff with everything
they leave behind, and this project's terminal queue rows and published notifications. Never the
token ledger (the record of what was charged) nor the main API's tables.

What a run leaves behind (read from Dagster 1.13's source), and how it goes here, a batch of runs
at a time:

- ``DagsterInstance.delete_run`` deletes the ``runs`` row, its events and the asset-event tags of
  its materializations, and frees the concurrency slots it holds, in ~8 statements and 4 commits
  per run (2.6 runs/s on a loaded Postgres: 11 h for 100,000 runs). Here the same statements run
  once per batch (``IN`` over the batch's run ids) on the storages' own connections and tables,
  and the concurrency-slot release (rare: a finished run holds none) goes through Dagster's own
  ``free_concurrency_slots_for_run`` for the runs that still hold one. Storages that are not
  Dagster's SQL ones fall back to ``delete_run`` per run.
- run tags: a foreign key with ``ON DELETE CASCADE``, which SQLite ignores (Dagster does not turn
  on ``PRAGMA foreign_keys``): deleted explicitly.
- the SQLite event log's per-run file ``<storage>/history/runs/<run_id>.db``: removed (opening
  it to empty it would first run Dagster's schema check on it, most of a second per run).
- compute logs, when a capturing compute log manager is configured (the repository's
  dagster.yaml captures none): ``compute_log_manager.delete_logs(prefix=[run_id])`` (keys are
  ``[run_id, "compute_logs", step]``).
- step outputs of the default ``fs_io_manager``: ``<storage>/<run_id>/``.

Order: files, then events, then the runs rows, which are what the next purge finds: a purge cut
short leaves no event or file without its run.

Used by the ``purge_history`` job (daily schedule) and ``flux-dagster purge``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEventType
from dagster._core.storage.event_log.schema import (
    AssetEventTagsTable,
    ConcurrencySlotsTable,
    PendingStepsTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from sqlalchemy import and_, delete, func, select, union
from sqlalchemy.orm import Session

from flux_dagster.db.models import TERMINAL_STATUSES, PendingExecution, StatusNotification, utcnow

FINISHED_RUN_STATUSES = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
DEFAULT_BATCH_SIZE = 500
# The events whose tags Dagster keeps in asset_event_tags (what delete_events_for_run clears).
ASSET_EVENT_TYPES = [DagsterEventType.ASSET_MATERIALIZATION.value, DagsterEventType.ASSET_OBSERVATION.value]


@dataclass
class PurgeCounts:
    runs: int = 0
    pending_executions: int = 0
    status_notifications: int = 0

    @property
    def total(self) -> int:
        return self.runs + self.pending_executions + self.status_notifications


def cutoff_for(older_than_days: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(days=older_than_days)


def _runs_filter(cutoff: datetime) -> RunsFilter:
    return RunsFilter(statuses=FINISHED_RUN_STATUSES, updated_before=cutoff)


def _old_rows(cutoff: datetime):
    # finished_at is set on every terminal transition; created_at covers rows from before it was.
    return and_(PendingExecution.status.in_(TERMINAL_STATUSES),
                func.coalesce(PendingExecution.finished_at, PendingExecution.created_at) < cutoff)


def _old_notifications(cutoff: datetime, redis_configured: bool):
    # With Redis, an unpublished row is the outbox: it must survive until it is published.
    old = StatusNotification.created_at < cutoff
    return and_(old, StatusNotification.published_at.is_not(None)) if redis_configured else old


def count_purgeable(instance: DagsterInstance, session: Session, cutoff: datetime,
                    redis_configured: bool) -> PurgeCounts:
    return PurgeCounts(
        runs=instance.get_runs_count(_runs_filter(cutoff)),
        pending_executions=session.scalar(select(func.count()).where(_old_rows(cutoff))) or 0,
        status_notifications=session.scalar(
            select(func.count()).where(_old_notifications(cutoff, redis_configured))) or 0,
    )


def delete_runs_with_artifacts(instance: DagsterInstance, run_ids: Sequence[str]) -> None:
    """Runs and every trace of them in Dagster's storage (see the module doc)."""
    runs, events = instance.run_storage, instance.event_log_storage
    for run_id in run_ids:
        instance.compute_log_manager.delete_logs(prefix=[run_id])
        shutil.rmtree(os.path.join(instance.storage_directory(), run_id), ignore_errors=True)
    if not (isinstance(runs, SqlRunStorage) and isinstance(events, SqlEventLogStorage)):
        for run_id in run_ids:
            instance.delete_run(run_id)
        return
    if isinstance(events, SqliteEventLogStorage):
        for run_id in run_ids:
            shard = events.path_for_shard(run_id)
            for path in (shard, f"{shard}-wal", f"{shard}-shm"):
                if os.path.exists(path):
                    os.unlink(path)
    # On SQLite the index shard holds the copies of asset events; elsewhere it is the event log.
    with events.index_connection() as conn:
        asset_event_ids = conn.execute(
            select(SqlEventLogStorageTable.c.id).where(
                SqlEventLogStorageTable.c.run_id.in_(run_ids),
                SqlEventLogStorageTable.c.dagster_event_type.in_(ASSET_EVENT_TYPES),
            )
        ).scalars().all()
        if asset_event_ids:
            conn.execute(AssetEventTagsTable.delete().where(AssetEventTagsTable.c.event_id.in_(asset_event_ids)))
        conn.execute(SqlEventLogStorageTable.delete().where(SqlEventLogStorageTable.c.run_id.in_(run_ids)))
    if events.supports_global_concurrency_limits:
        with events.index_connection() as conn:
            holders = conn.execute(
                union(select(ConcurrencySlotsTable.c.run_id).where(ConcurrencySlotsTable.c.run_id.in_(run_ids)),
                      select(PendingStepsTable.c.run_id).where(PendingStepsTable.c.run_id.in_(run_ids)))
            ).scalars().all()
        for run_id in holders:
            events.free_concurrency_slots_for_run(run_id)
    with runs.connect() as conn:
        conn.execute(RunTagsTable.delete().where(RunTagsTable.c.run_id.in_(run_ids)))
        conn.execute(RunsTable.delete().where(RunsTable.c.run_id.in_(run_ids)))


def purge_history(
    instance: DagsterInstance,
    session_factory: Callable[[], AbstractContextManager[Session]],
    cutoff: datetime,
    redis_configured: bool,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int], None] = lambda n: None,
) -> PurgeCounts:
    """Delete runs, then rows, older than ``cutoff``, ``batch_size`` at a time (short
    transactions, so a running deployment keeps its latency). ``on_progress(n)`` after each
    batch of ``n`` deletions. ``session_factory()`` is a context manager giving a committed
    session (``session_scope``)."""
    counts = PurgeCounts()
    runs_filter = _runs_filter(cutoff)
    while run_ids := instance.get_run_ids(runs_filter, limit=batch_size):
        delete_runs_with_artifacts(instance, run_ids)
        counts.runs += len(run_ids)
        on_progress(len(run_ids))
    for model, where, field in (
        (PendingExecution, _old_rows(cutoff), "pending_executions"),
        (StatusNotification, _old_notifications(cutoff, redis_configured), "status_notifications"),
    ):
        while True:
            with session_factory() as session:
                ids = session.scalars(select(model.id).where(where).order_by(model.id).limit(batch_size)).all()
                if ids:
                    session.execute(delete(model).where(model.id.in_(ids)).execution_options(synchronize_session=False))
            if not ids:
                break
            setattr(counts, field, getattr(counts, field) + len(ids))
            on_progress(len(ids))
    return counts
