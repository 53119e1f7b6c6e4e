"""Nothing lost, nothing twice (in-process): the retry schedule, the notification outbox,
re-execution of a completed execution, cancellation before the run starts, bounded errors,
estimated usage. The same properties under real faults, through a real daemon, are in faults/."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timezone

import pytest
import redis
from dagster import DagsterInstance, RetryPolicy

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import NodeExecution, PendingExecution, StatusNotification, TokenLedgerEntry
from flux_dagster.errors import MAX_USER_MESSAGE, ProviderError, UserConfigError
from flux_dagster.execution import ExecutionRequest
from flux_dagster.jobs.process_single_node import process_single_node
from flux_dagster.ops import retries
from flux_dagster.services.notifications import Notifier, flush_outbox
from flux_dagster_tests.conftest import add_node, execute_node, make_resources, rows

OPENAI_NODE = {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Say hi."}
REDIS_URL = "redis://127.0.0.1:6379/0"


def llm_calls(server):
    return [r for r in server.requests if r.path.endswith(("/chat/completions", "/messages"))]


def dead_redis_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


# ----- the schedule --------------------------------------------------------------------------


def test_schedule_covers_two_minutes_and_stops_within_five(monkeypatch):
    monkeypatch.setattr(retries, "_DELAY_SCALE", 1.0)
    monkeypatch.setattr(retries.random, "uniform", lambda a, b: 0.0)
    policy = RetryPolicy(max_retries=9, delay=1.0)
    waits = [retries.retry_delay(policy, n) for n in range(policy.max_retries)]
    assert waits[:6] == [1, 2, 4, 8, 16, 30] and max(waits) == retries.MAX_DELAY_S
    assert sum(waits) * 0.8 >= 120  # even with the jitter all the way down
    assert not retries.should_retry(policy, 9, 10, 1)  # out of retries
    assert not retries.should_retry(policy, 3, 280, 30)  # would end past 5 minutes
    assert retries.should_retry(policy, 3, 60, 8, attempt_timeout_s=60)


def test_schedule_honours_retry_after(monkeypatch):
    monkeypatch.setattr(retries, "_DELAY_SCALE", 1.0)
    policy = RetryPolicy(max_retries=9, delay=1.0)
    asked = ProviderError("slow down", retryable=True, retry_after_s=20)
    assert retries.retry_delay(policy, 0, asked) == 20
    assert retries.retry_delay(policy, 0, ProviderError("x", retryable=True, retry_after_s=3600)) == 60


def test_retry_after_reaches_the_retry_from_the_sdk(app_db_url, fake_llm):
    fake_llm.failures, fake_llm.retry_after = [429], "7"
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url), flow_id, node_id)
    assert run.result.success and len(llm_calls(fake_llm)) == 2
    [retry] = [e for e in run.result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retry.event_specific_data.seconds_to_wait == pytest.approx(7 * retries._DELAY_SCALE)


def test_errors_are_bounded():
    huge = "x" * 1_000_000
    error = UserConfigError(f"bad value {huge}")
    assert len(error.user_message) <= MAX_USER_MESSAGE and "more characters cut" in error.user_message


def test_a_megabyte_ai_system_fails_with_a_bounded_message(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", {**OPENAI_NODE, "AiSystem": "x" * 1_000_000})
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    [row] = rows(app_db_url, PendingExecution, id=run.pending_id)
    assert row.status == "failed" and "Unknown or missing AI provider" in row.error
    assert len(row.error) <= MAX_USER_MESSAGE


def test_node_data_that_is_not_an_object_ends_its_execution_row_failed(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", [1, 2, 3])
    run = execute_node(app_db_url, make_resources(app_db_url), flow_id, node_id)
    [execution] = rows(app_db_url, NodeExecution, nodeId=node_id)
    assert (execution.status, execution.isError) == ("FAILED", True)
    assert "malformed data" in execution.output and rows(app_db_url, PendingExecution, id=run.pending_id)[0].status == "failed"


# ----- notifications never fail an execution -------------------------------------------------


def test_statuses_wait_while_redis_is_away_and_are_published_in_order(app_db_url):
    channel = f"flux-test-outbox-{time.monotonic_ns()}"
    down = Notifier(database_url=app_db_url, redis_url=dead_redis_url(), channel=channel)
    request = ExecutionRequest(exec_id="exec-outbox", flow_id="flow-1", user_id="user-1")
    for status in ("PENDING", "COMPLETED"):
        down.publish(request, "node-a", status)  # never raises
    kept = rows(app_db_url, StatusNotification, exec_id="exec-outbox")
    assert [(r.status, r.published_at) for r in kept] == [("PENDING", None), ("COMPLETED", None)]

    subscriber = redis.Redis.from_url(REDIS_URL).pubsub()
    subscriber.subscribe(channel)
    subscriber.get_message(timeout=2)  # the subscribe confirmation
    back = Notifier(database_url=app_db_url, redis_url=REDIS_URL, channel=channel)
    back.publish(request, "node-a", "FAILED")  # waits behind the two kept ones: order per node
    assert flush_outbox(app_db_url, REDIS_URL, channel) == 3
    received = []
    while (message := subscriber.get_message(timeout=2)) is not None:
        received.append(json.loads(message["data"])["payload"]["nodes"]["node-a"]["status"])
    assert received == ["PENDING", "COMPLETED", "FAILED"]
    assert all(r.published_at for r in rows(app_db_url, StatusNotification, exec_id="exec-outbox"))


def test_an_execution_completes_while_redis_is_away(app_db_url, fake_llm, fake_main_api):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api, redis_url=dead_redis_url())
    run = execute_node(app_db_url, resources, flow_id, node_id)
    assert run.result.success and len(fake_main_api.charges) == 1
    kept = rows(app_db_url, StatusNotification, exec_id=run.exec_id)
    assert [r.status for r in kept] == ["PENDING", "COMPLETED"] and not any(r.published_at for r in kept)


# ----- re-execution and cancellation ------------------------------------------------------------


def _rerun(app_db_url: str, resources: dict, run) -> tuple[object, list[str]]:
    """Another run of the same execution (what "Re-execute" in the UI starts): same config and
    tags. Returns the result and the run's log messages."""
    instance = DagsterInstance.ephemeral()
    result = process_single_node.execute_in_process(
        run_config=run.result.dagster_run.run_config, tags=run.result.dagster_run.tags, resources=resources,
        instance=instance, raise_on_error=False,
    )
    return result, [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_re_executing_a_completed_execution_never_generates_or_charges_again(app_db_url, fake_llm, fake_main_api):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api)
    first = execute_node(app_db_url, resources, flow_id, node_id)
    assert first.result.success
    for _ in range(2):
        again, logs = _rerun(app_db_url, resources, first)
        assert again.success
        assert any("not generated or charged again" in message for message in logs)
    assert len(llm_calls(fake_llm)) == 1
    assert len(fake_main_api.calls("/worker/charge-tokens")) == 1 and len(fake_main_api.charges) == 1
    assert len(rows(app_db_url, TokenLedgerEntry, exec_id=first.exec_id)) == 1
    assert rows(app_db_url, PendingExecution, id=first.pending_id)[0].status == "completed"


def test_cancelled_while_its_run_waited_never_calls_the_llm(app_db_url, fake_llm, fake_main_api, monkeypatch):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api)
    from flux_dagster import queue

    original = queue.mark_running

    def cancelled_meanwhile(session, pending_id, run_id):  # the main API cancels as the run starts
        session.get(PendingExecution, pending_id).cancel_requested_at = datetime.now(timezone.utc)
        return original(session, pending_id, run_id)

    monkeypatch.setattr(queue, "mark_running", cancelled_meanwhile)
    run = execute_node(app_db_url, resources, flow_id, node_id)
    assert not run.result.success and run.result.dagster_run.status.value == "CANCELED"
    assert llm_calls(fake_llm) == [] and fake_main_api.calls("/worker/charge-tokens") == []
    [row] = rows(app_db_url, PendingExecution, id=run.pending_id)
    assert row.status == "cancelled"
    statuses = [n.payload["nodes"][node_id]["status"] for n in rows(app_db_url, StatusNotification, exec_id=run.exec_id)]
    assert statuses == ["CANCELLED"]


# ----- usage ----------------------------------------------------------------------------------


def test_an_answer_without_usage_is_charged_an_estimate_marked_so(app_db_url, fake_llm, fake_main_api):
    fake_llm.usage = {}  # a provider that reports no usage
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    run = execute_node(app_db_url, make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api),
                       flow_id, node_id)
    assert run.result.success
    [charge] = fake_main_api.charges.values()
    assert charge["estimated"] is True and charge["inputTokens"] > 0 and charge["outputTokens"] > 0
    [entry] = rows(app_db_url, TokenLedgerEntry, exec_id=run.exec_id)
    assert entry.estimated


def test_rerun_is_a_new_execution_charged_anew(app_db_url, fake_llm, fake_main_api, monkeypatch):
    from click.testing import CliRunner

    from flux_dagster.cli import main

    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    resources = make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api)
    first = execute_node(app_db_url, resources, flow_id, node_id)
    monkeypatch.setenv("FLUX_DATABASE_URL", app_db_url)
    done = CliRunner().invoke(main, ["rerun", first.exec_id])
    assert done.exit_code == 0, done.output
    [new] = [r for r in rows(app_db_url, PendingExecution, flow_id=flow_id) if r.exec_id != first.exec_id]
    assert (new.status, new.node_id, new.user_id) == ("pending", node_id, "user-1")
    assert CliRunner().invoke(main, ["rerun", "no-such-exec"]).exit_code != 0


def test_an_op_past_its_deadline_ends_with_a_clear_timeout(monkeypatch):
    from dagster import job, op

    monkeypatch.setitem(retries.OP_DEADLINES_S, "stuck_stage", 0.5)
    monkeypatch.setattr(retries, "NOT_RETRIED_ON_DEADLINE", ("stuck_stage",))

    @op
    def stuck_stage():
        with retries.node_errors():
            time.sleep(30)

    @job
    def stuck():
        stuck_stage()

    result = stuck.execute_in_process(raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "did not finish within 0.5 s" in failure.event_specific_data.error.message


def test_a_second_launch_of_a_row_that_is_running_does_nothing(app_db_url, fake_llm, fake_main_api):
    import uuid as _uuid

    from dagster import DagsterRun, DagsterRunStatus

    from flux_dagster import queue
    from flux_dagster.sensors.pending_executions import run_request_for

    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    instance = DagsterInstance.ephemeral()
    first = DagsterRun(job_name="process_single_node", run_id=str(_uuid.uuid4()), status=DagsterRunStatus.STARTED)
    instance.add_run(first)
    with session_scope(app_db_url) as session:
        row = queue.enqueue(session, kind="node", exec_id=str(_uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                            user_id="user-1", session_id="session-1")
        row.status, row.dagster_run_id = "running", first.run_id  # the first launch is at work
        request = run_request_for(row, None)
        pending_id = row.id
    result = process_single_node.execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=instance, raise_on_error=False,
        resources=make_resources(app_db_url, llm_url=fake_llm.url, main_api=fake_main_api),
    )
    assert result.success and llm_calls(fake_llm) == [] and fake_main_api.charges == {}
    [row] = rows(app_db_url, PendingExecution, id=pending_id)
    assert (row.status, row.dagster_run_id) == ("running", first.run_id)
    assert any("already executing this execution" in e.user_message for e in instance.all_logs(result.run_id))
