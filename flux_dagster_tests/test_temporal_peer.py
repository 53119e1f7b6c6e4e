"""The Temporal peer of the benchmark (bench/temporal_peer.py), without a Temporal server: its
activities run through temporalio's ActivityEnvironment against a SQLite app DB and the loopback
LLM, their arguments and results through temporalio's data converter as a server would carry
them; the workflow runs in-process with that stand-in for ``execute_activity_method``, and its
module passes the workflow sandbox's validation. Also: its step table and clients are the
originals' (it restates them to stay free of Dagster), and without a ``temporal`` CLI
``run_peer`` says what is missing."""

from __future__ import annotations

import asyncio
import threading
import json
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("temporalio")

from temporalio import activity, workflow  # noqa: E402
from temporalio.api.failure.v1 import Failure  # noqa: E402
from temporalio.converter import DataConverter  # noqa: E402
from temporalio.exceptions import ActivityError, ApplicationError, RetryState  # noqa: E402
from temporalio.testing import ActivityEnvironment  # noqa: E402
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner  # noqa: E402

from bench import temporal_peer as peer  # noqa: E402
from bench.harness import in_flight_llm  # noqa: E402
from flux_dagster import demo, queue  # noqa: E402
from flux_dagster.db.engine import session_scope  # noqa: E402
from flux_dagster.db.models import (  # noqa: E402
    ExecutionLog, NodeExecution, PendingExecution, StatusNotification, TokenLedgerEntry,
)
from flux_dagster_tests.conftest import rows  # noqa: E402

CONVERTER = DataConverter.default


@pytest.fixture
def services(sqlite_app_db_url, fake_llm, tmp_path, monkeypatch) -> peer.PeerServices:
    """The worker's clients as ``from_env`` builds them in the worker process."""
    for name in ("URL_MAIN_API", "REDIS_URL", "FLUX_LLM_MODE", "FLUX_FILES_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLUX_DATABASE_URL", sqlite_app_db_url)
    monkeypatch.setenv("FLUX_HOME", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{fake_llm.url}/v1")
    return peer.PeerServices.from_env()


def enqueue(url: str, node_id: str = "summarize"):
    with session_scope(url) as session:
        row = queue.enqueue(session, kind="node", exec_id=str(uuid.uuid4()), flow_id=demo.DEMO_FLOW, node_id=node_id,
                            user_id=demo.DEMO_USER, session_id="peer-test")
        return queue.request_of(row)


def carried(values: list, types: list) -> list:
    """``values`` after a trip through the data converter, decoded as ``types`` (what a worker gets)."""
    return CONVERTER.payload_converter.from_payloads(CONVERTER.payload_converter.to_payloads(values), types)


def run_activity(activities: peer.PeerActivities, method, *args, attempt: int = 1):
    bound = getattr(activities, method.__name__)
    defn = activity._Definition.must_from_callable(bound)
    env = ActivityEnvironment()
    env.info = replace(env.info, attempt=attempt, activity_type=defn.name, workflow_run_id="peer-test-run")
    result = env.run(bound, *carried(list(args), defn.arg_types))
    return None if defn.ret_type is type(None) else carried([result], [defn.ret_type])[0]


def in_process_executor(activities: peer.PeerActivities, calls: list[str], retry_delays: list | None = None):
    """``workflow.execute_activity_method`` without a server: each attempt in an ActivityEnvironment,
    retried as the retry policy says (without the waits; the delays asked for go to
    ``retry_delays``), a final failure handed to the workflow as the ActivityError a server would
    (its cause through the failure converter)."""

    async def execute(method, *, args, start_to_close_timeout, retry_policy):
        assert start_to_close_timeout.total_seconds() == peer.STEPS[method.__name__].deadline_s
        for attempt in range(1, retry_policy.maximum_attempts + 1):
            calls.append(method.__name__)
            try:
                return run_activity(activities, method, *args, attempt=attempt)
            except ApplicationError as exc:
                if not exc.non_retryable and attempt < retry_policy.maximum_attempts:
                    if retry_delays is not None:
                        retry_delays.append(exc.next_retry_delay)
                    continue
                failure = Failure()
                await CONVERTER.encode_failure(exc, failure)
                cause = await CONVERTER.decode_failure(failure)
                raise ActivityError("Activity task failed", scheduled_event_id=1, started_event_id=2, identity="test",
                                    activity_type=method.__name__, activity_id="1",
                                    retry_state=RetryState.NON_RETRYABLE_FAILURE) from cause

    return execute


def run_workflow(services, request, monkeypatch, retry_delays: list | None = None) -> tuple[str, list[str]]:
    calls: list[str] = []
    monkeypatch.setattr(workflow, "execute_activity_method",
                        in_process_executor(peer.PeerActivities(services), calls, retry_delays))
    [request] = carried([request], [peer.ExecutionRequest])
    return asyncio.run(peer.ProcessSingleNode().run(request)), calls


def test_each_activity_completes_the_demo_node_and_charges_once(services, fake_llm):
    url, acts = services.database_url, peer.PeerActivities(services)
    request = run_activity(acts, peer.PeerActivities.notify_status_pending, enqueue(url))
    [row] = rows(url, PendingExecution, id=request.pending_execution_id)
    assert row.status == "running" and row.dagster_run_id == "peer-test-run"
    task = run_activity(acts, peer.PeerActivities.get_info_in_database, request)
    assert task.node_type == "commandTextNode" and task.data["aiModel"] == "gpt-4o-mini"
    task = run_activity(acts, peer.PeerActivities.validate_model_access, task)
    generation = run_activity(acts, peer.PeerActivities.text_generator, task)
    assert generation.output == fake_llm.text and generation.generation_id == "peer-test-run/text_generator"
    outcome = run_activity(acts, peer.PeerActivities.charge_tokens, task, generation)
    assert outcome.extra["charged"]
    # A retried charge (same generation) is the same charge.
    assert run_activity(acts, peer.PeerActivities.charge_tokens, task, generation, attempt=2).extra["charged"]
    outcome = run_activity(acts, peer.PeerActivities.generate_file, outcome)
    outcome = run_activity(acts, peer.PeerActivities.generate_execution_logs, outcome)
    run_activity(acts, peer.PeerActivities.notify_status_completed, outcome)

    [row] = rows(url, PendingExecution, id=request.pending_execution_id)
    assert row.status == "completed" and row.error is None
    [execution] = rows(url, NodeExecution, execId=request.exec_id)
    assert execution.status == "COMPLETED" and execution.output == fake_llm.text
    [charge] = rows(url, TokenLedgerEntry, exec_id=request.exec_id)
    assert charge.state == "charged" and (charge.input_tokens, charge.output_tokens) == (11, 7)
    statuses = [n.status for n in rows(url, StatusNotification, exec_id=request.exec_id)]
    assert statuses == ["PENDING", "COMPLETED"]
    [log] = rows(url, ExecutionLog, nodeId="summarize")
    assert not log.isError and log.message == "Node executed successfully"
    assert len(fake_llm.generations("Explain what a workflow execution worker does.")) == 1


def test_the_workflow_runs_the_text_generator_path_with_retries(services, fake_llm, monkeypatch):
    fake_llm.failures = [500, 429]  # retryable: two attempts of text_generator fail, the third answers
    fake_llm.retry_after = "3"
    request = enqueue(services.database_url)
    delays: list = []
    result, calls = run_workflow(services, request, monkeypatch, delays)
    assert result == "completed"
    assert delays == [timedelta(seconds=3)] * 2  # the provider's Retry-After, as the next retry's delay
    assert calls == ["notify_status_pending", "get_info_in_database", "validate_model_access", "text_generator",
                     "text_generator", "text_generator", "charge_tokens", "generate_file", "generate_execution_logs",
                     "notify_status_completed"]
    [row] = rows(services.database_url, PendingExecution, id=request.pending_execution_id)
    assert row.status == "completed"
    assert len(rows(services.database_url, TokenLedgerEntry, exec_id=request.exec_id)) == 1


def test_the_workflow_takes_the_error_path_once(services, fake_llm, monkeypatch):
    request = enqueue(services.database_url, "retired-model")  # an inactive model: not retryable
    result, calls = run_workflow(services, request, monkeypatch)
    assert result == "failed"
    assert calls == ["notify_status_pending", "get_info_in_database", "validate_model_access", "node_execution_error"]
    url = services.database_url
    [row] = rows(url, PendingExecution, id=request.pending_execution_id)
    assert row.status == "failed" and "gpt-3.5-turbo is not available" in row.error
    [log] = rows(url, ExecutionLog, nodeId="retired-model")
    assert log.isError and "Traceback" in log.errorStack
    [execution] = rows(url, NodeExecution, execId=request.exec_id)
    assert execution.status == "FAILED" and execution.metadata_["code"] == "USER_CONFIG_ERROR"
    statuses = [n.status for n in rows(url, StatusNotification, exec_id=request.exec_id)]
    assert statuses == ["PENDING", "FAILED"]
    assert not fake_llm.generations("This model is inactive")


def test_a_cancelled_row_ends_cancelled_before_any_work(services, fake_llm, monkeypatch):
    from flux_dagster.db.models import utcnow

    request = enqueue(services.database_url)
    with session_scope(services.database_url) as session:
        session.get(PendingExecution, request.pending_execution_id).cancel_requested_at = utcnow()
    result, calls = run_workflow(services, request, monkeypatch)
    assert (result, calls) == ("cancelled", ["notify_status_pending", "node_execution_error"])
    [row] = rows(services.database_url, PendingExecution, id=request.pending_execution_id)
    assert row.status == "cancelled" and not fake_llm.requests


def test_the_workflow_module_passes_the_sandbox():
    async def prepare():
        SandboxedWorkflowRunner().prepare_workflow(workflow._Definition.must_from_class(peer.ProcessSingleNode))

    asyncio.run(prepare())


def test_steps_are_the_ops_retry_rules_and_deadlines():
    from flux_dagster.ops import retries

    scale = retries._DELAY_SCALE
    for name, step in peer.STEPS.items():
        policy = retries.RETRY_POLICIES.get(name) or retries.RETRY_POLICIES["notify_status"]
        assert (step.retries, step.first_delay_s) == (policy.max_retries, pytest.approx(policy.delay / scale)), name
        assert step.deadline_s == retries.OP_DEADLINES_S.get(name, retries.DEFAULT_DEADLINE_S), name
    assert peer.CANCELLED_MESSAGE == retries.CANCELLED_MESSAGE
    assert set(peer.STEPS) == {a.__temporal_activity_definition.name for a in peer.PeerActivities(None).all()}


def test_clients_are_the_dagster_resources_clients(services):
    import dagster

    from flux_dagster.resources import build_resources

    with dagster.build_resources(build_resources()) as resources:
        assert services.main_api == resources.main_api.client()
        assert services.notifier == resources.notifier.client()
        assert services.llm == resources.llm.client()
        assert services.database_url == resources.app_db.url
        assert services.file_store.root == resources.file_store.store().root


def test_run_peer_says_what_is_missing_without_a_temporal_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUX_TEMPORAL_CLI", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(peer.PeerUnavailable, match="no `temporal` on PATH"):
        peer.run_peer(quick=True)  # as bench/peer.py calls it
    monkeypatch.setenv("FLUX_TEMPORAL_CLI", str(tmp_path / "temporal"))
    with pytest.raises(peer.PeerUnavailable, match="FLUX_TEMPORAL_CLI=.* is not an executable"):
        peer.run_peer()


def test_the_reference_figures_have_run_peers_keys():
    reference = json.loads((Path(peer.__file__).parent / "peer_reference.json").read_text())
    assert set(peer.RESULT_KEYS) <= set(reference)
    assert set(reference["cpu_s_per_execution"]) == set(reference["drain_s"]) == set(peer.LATENCIES)


class InProcessClient:
    """``Client.start_workflow`` as a server and worker would answer it: the workflow runs on its
    own (a thread here), its activities in process."""

    def __init__(self, services: peer.PeerServices, monkeypatch):
        self.calls: list[str] = []
        self.threads: list[threading.Thread] = []
        monkeypatch.setattr(workflow, "execute_activity_method",
                            in_process_executor(peer.PeerActivities(services), self.calls))

    async def start_workflow(self, run, request, *, id: str, task_queue: str):
        assert (run, task_queue) == (peer.ProcessSingleNode.run, peer.TASK_QUEUE)
        assert id == f"pending-execution-{request.pending_execution_id}"
        [request] = carried([request], [peer.ExecutionRequest])
        thread = threading.Thread(target=asyncio.run, args=(peer.ProcessSingleNode().run(request),))
        thread.start()
        self.threads.append(thread)


def test_measure_reports_every_figure_of_a_deployment(postgres_url, monkeypatch, tmp_path):
    """The figures' bookkeeping (rows, workflow ids, completion, CPU, peaks) on the real app DB
    schema on Postgres, with the in-process stand-in for the dev server and the worker."""
    psutil = pytest.importorskip("psutil")  # the bench extra's

    from flux_dagster_tests.conftest import PG_ADMIN_URL, _seeded, _truncate

    _truncate(postgres_url)
    _seeded(postgres_url)
    with in_flight_llm(latency_s=0.05) as llm:
        for name in ("URL_MAIN_API", "REDIS_URL", "FLUX_LLM_MODE", "FLUX_FILES_BUCKET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("FLUX_DATABASE_URL", f"{postgres_url}?application_name={peer.APPLICATION_NAME}")
        monkeypatch.setenv("FLUX_HOME", str(tmp_path))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{llm.url}/v1")
        client = InProcessClient(peer.PeerServices.from_env(), monkeypatch)
        figures = asyncio.run(peer.measure(client, postgres_url, llm, [psutil.Process()], [], PG_ADMIN_URL, burst=4,
                                           sequential=2, latencies={"fast": 0.01, "slow": 1.0}, drain_bound_s=120,
                                           gap_s=(0, 0)))
        for thread in client.threads:
            thread.join(30)
    assert tuple(figures) == peer.RESULT_KEYS
    assert set(figures["cpu_s_per_execution"]) == set(figures["drain_s"]) == {"fast", "slow"}
    assert all(v > 0 for v in [*figures["cpu_s_per_execution"].values(), *figures["drain_s"].values()])
    assert 1 <= figures["peak_in_flight"] <= 4 and llm.open == 0  # every stream counted in, then out
    assert figures["peak_pg_connections"] >= 1  # the worker's pooled connections, by application_name
    assert figures["sequential_p50_s"] > 0 and figures["peak_pss_mb"] > 0
    assert client.calls.count("charge_tokens") == 1 + 2 + 2 * 4  # warm-up, sequential, bursts: charged once each
    assert len(rows(postgres_url, TokenLedgerEntry)) == 11
