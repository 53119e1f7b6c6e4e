"""``requeue_failed_executions``: a day's failed executions queued again, once."""

import uuid
from datetime import datetime, timezone

from sqlalchemy import select, update

from flux_dagster import queue
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import PendingExecution
from flux_dagster.jobs.requeue_failed_executions import requeue_failed_executions
from flux_dagster_tests.conftest import make_resources


def test_a_days_failed_executions_are_queued_again_once(app_db_url):
    day = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)
    with session_scope(app_db_url) as s:
        def row(status, created_at, exec_id=None):
            r = queue.enqueue(s, kind="node", exec_id=exec_id or str(uuid.uuid4()), flow_id="f", node_id="n",
                              user_id="u", priority=3)
            s.execute(update(PendingExecution).where(PendingExecution.id == r.id)
                      .values(status=status, created_at=created_at))
            return r
        failed = row("failed", day)
        row("completed", day)
        row("failed", datetime(2026, 11, 21, 1, tzinfo=timezone.utc))  # another day
        retried = row("failed", day)
        row("pending", day.replace(hour=13), exec_id=retried.exec_id)  # already queued again
        failed_exec_id = failed.exec_id

    resources = {"app_db": make_resources(app_db_url)["app_db"]}
    for _ in range(2):  # the same backfill twice queues nothing twice
        result = requeue_failed_executions.execute_in_process(partition_key="2026-11-20", resources=resources)
        assert result.success
    with session_scope(app_db_url) as s:
        new = s.scalars(select(PendingExecution).where(PendingExecution.exec_id == failed_exec_id,
                                                       PendingExecution.status == "pending")).all()
        assert len(new) == 1 and (new[0].node_id, new[0].priority) == ("n", 3)
        assert s.query(PendingExecution).filter_by(status="pending").count() == 2
