"""``pending_executions_sensor`` and the queue: bounded, fair batches; bad rows fail alone."""

import uuid
from datetime import timedelta

from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context
from sqlalchemy import select, update

from flux_dagster import queue
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import PendingExecution, utcnow
from flux_dagster.sensors import pending_executions as sensor_module
from flux_dagster.sensors.pending_executions import pending_executions_sensor
from flux_dagster_tests.conftest import make_resources


def enqueue(url, n=1, **fields):
    defaults = dict(kind="node", flow_id="f", node_id="n", user_id="u")
    with session_scope(url) as s:
        return [queue.enqueue(s, exec_id=str(uuid.uuid4()), **{**defaults, **fields}).id for _ in range(n)]


def tick(url, instance):
    resources = make_resources(url)
    with build_sensor_context(instance=instance, resources={k: resources[k] for k in ("app_db", "notifier")}) as context:
        return pending_executions_sensor(context)


def test_each_user_gets_a_turn_within_a_bounded_batch(app_db_url):
    heavy = enqueue(app_db_url, 30, user_id="heavy")
    light = enqueue(app_db_url, 2, user_id="light")
    urgent = enqueue(app_db_url, 1, user_id="heavy", priority=5)
    with session_scope(app_db_url) as s:
        claimed = [r.id for r in queue.claim_batch(s, 6, timedelta(seconds=60))]
    assert claimed == [urgent[0], light[0], heavy[0], light[1], heavy[1], heavy[2]]
    with session_scope(app_db_url) as s:
        assert queue.queue_summary(s) == {"launched": 6, "pending": 27}


def test_sensor_requests_one_run_per_row_with_tags(app_db_url, monkeypatch):
    monkeypatch.setattr(sensor_module, "BATCH_SIZE", 3)
    ids = enqueue(app_db_url, 4, session_id="s1")
    with DagsterInstance.ephemeral() as instance:
        requests = tick(app_db_url, instance)
        assert [r.run_key for r in requests] == [f"pending-execution-{i}" for i in ids[:3]]
        assert requests[0].tags["flux/exec_id"] and requests[0].tags["flux/node_id"] == "n"
        assert requests[0].run_config["ops"]["notify_status_pending"]["config"]["session_id"] == "s1"
        assert [r.run_key for r in tick(app_db_url, instance)] == [f"pending-execution-{ids[3]}"]
        assert isinstance(tick(app_db_url, instance), SkipReason)


def test_stale_launched_rows_are_offered_again_with_the_same_run_key(app_db_url):
    [row_id] = enqueue(app_db_url)
    with DagsterInstance.ephemeral() as instance:
        [first] = tick(app_db_url, instance)
        with session_scope(app_db_url) as s:
            s.execute(update(PendingExecution).values(launched_at=utcnow() - timedelta(hours=1)))
        [again] = tick(app_db_url, instance)
    assert first.run_key == again.run_key == f"pending-execution-{row_id}"


def test_malformed_and_cancelled_rows_end_without_a_run_and_do_not_stop_the_tick(app_db_url):
    good = enqueue(app_db_url)
    bad_kind = enqueue(app_db_url, kind="robot")
    no_node = enqueue(app_db_url, node_id=None)
    no_user = enqueue(app_db_url, user_id="")
    cancelled = enqueue(app_db_url, cancel_requested_at=utcnow())
    with DagsterInstance.ephemeral() as instance:
        requests = tick(app_db_url, instance)
    assert [r.run_key for r in requests if isinstance(r, RunRequest)] == [f"pending-execution-{good[0]}"]
    with session_scope(app_db_url) as s:
        status = {r.id: (r.status, r.error) for r in s.scalars(select(PendingExecution))}
    assert status[bad_kind[0]] == ("failed", "Unknown execution kind 'robot': expected one of node, agent, delivery.")
    assert status[no_node[0]] == ("failed", "Execution row is missing node_id.")
    assert status[no_user[0]] == ("failed", "Execution row is missing user_id.")
    assert status[cancelled[0]] == ("cancelled", "Cancelled before it started.")
