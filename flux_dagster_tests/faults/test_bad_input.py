"""Bad input and users' own systems (goals 6 and 7 of issue 8), on one deployment: bad data fails
its one execution with a bounded message and the node_executions row says FAILED; side effects on
a user's server or database are not repeated."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import create_engine, select, text

from flux_dagster.db.engine import normalize_url, session_scope
from flux_dagster.db.models import ExecutionLog, NodeExecution
from flux_dagster_tests.deployment import postgres_database
from flux_dagster_tests.fakes.http import LoopbackServer, Reply

pytestmark = pytest.mark.faults

MAX_ERROR = 2000


def _run(world, report, fault: str, node_type: str, data, *, pre_create_node_execution: bool = False):
    [node_id] = world.add_nodes(1, node_type=node_type, data=data)
    if pre_create_node_execution:
        # The main API creates the execution's node_executions row (RUNNING) before queueing it.
        exec_id = str(uuid.uuid4())
        with session_scope(world.harness_url) as s:
            s.add(NodeExecution(execId=exec_id, flowId=world.flow_id, nodeId=node_id, type=node_type,
                                status="RUNNING", isError=False))
        from flux_dagster import queue
        from flux_dagster_tests.faults.harness import USER, Execution

        with session_scope(world.harness_url) as s:
            row = queue.enqueue(s, kind="node", exec_id=exec_id, flow_id=world.flow_id, node_id=node_id,
                                user_id=USER, session_id="faults")
            execution = Execution(row.id, exec_id, node_id)
    else:
        [execution] = world.enqueue([node_id])
    drain = world.wait([execution], 300)
    outcome = report(world.outcome(fault, [execution], drain))
    return execution, outcome, world.rows([execution])[execution.pending_id]


def _user_facing_errors(world, execution) -> list[str]:
    texts = [world.rows([execution])[execution.pending_id].error or ""]
    node_execution = world.node_execution(execution)
    if node_execution is not None:
        texts.append(node_execution.output or "")
    with session_scope(world.harness_url) as s:
        texts += [log.message for log in s.scalars(select(ExecutionLog).where(ExecutionLog.nodeId == execution.node_id))]
    texts += [m["payload"]["nodes"][execution.node_id].get("userMessage") or "" for m in world.redis.messages
              if m["payload"].get("execId") == execution.exec_id]
    return texts


def test_one_megabyte_ai_system(shared_world, report):
    world = shared_world
    execution, outcome, row = _run(world, report, "node whose AiSystem is a 1 MB string", "commandTextNode",
                                   {"AiSystem": "x" * 1_000_000, "aiModel": "gpt-4o-mini", "prompt": "hi"})
    assert row.status == "failed"
    lengths = [len(t) for t in _user_facing_errors(world, execution)]
    assert max(lengths) <= MAX_ERROR, f"user-facing error of {max(lengths):,} characters"


def test_node_data_not_an_object(shared_world, report):
    world = shared_world
    execution, outcome, row = _run(world, report, "node whose data is not an object", "commandTextNode",
                                   ["not", "an", "object"], pre_create_node_execution=True)
    assert row.status == "failed" and row.error
    node_execution = world.node_execution(execution)
    assert (node_execution.status, node_execution.isError) == ("FAILED", True), \
        f"node_executions row left {node_execution.status}, isError {node_execution.isError}"
    assert node_execution.output and len(node_execution.output) <= MAX_ERROR


class UserServer(LoopbackServer):
    """A user's API: answers ``status`` (after ``delay_s``) the first ``failing`` times, then 200."""

    def __init__(self, status: int, delay_s: float = 0.0, failing: int = 10**6):
        self.status, self.delay_s, self.failing = status, delay_s, failing
        self._lock = threading.Lock()
        super().__init__(self._answer)

    def _answer(self, req) -> Reply:
        with self._lock:
            self.failing -= 1
            failing = self.failing >= 0
        if failing:
            return Reply(self.status, {"error": "down"}, delay_s=self.delay_s)
        return Reply(200, {"ok": True})


def _api_call(world, report, fault: str, method: str, server: UserServer):
    with server:
        execution, outcome, row = _run(world, report, fault, "apiCaller",
                                       {"method": method, "url": f"{server.url}/orders",
                                        **({"jsonRequestBody": '{"item": 1}'} if method != "GET" else {})})
        return row, len([r for r in server.requests if r.method == method])


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_api_caller_write_against_500_not_retried(shared_world, report, method):
    row, requests = _api_call(shared_world, report, f"API caller {method} against a server answering 500",
                              method, UserServer(500))
    assert row.status == "failed"
    assert requests == 1, f"{method} sent {requests} times"


def test_api_caller_post_timing_out_not_retried(shared_world, report):
    row, requests = _api_call(shared_world, report, "API caller POST against a server that times out", "POST",
                              UserServer(200, delay_s=35, failing=10**6))
    assert row.status == "failed"
    assert requests == 1, f"POST sent {requests} times"


def test_api_caller_get_retried(shared_world, report):
    row, requests = _api_call(shared_world, report, "API caller GET against a server answering 500 twice", "GET",
                              UserServer(500, failing=2))
    assert row.status == "completed", row.error
    assert requests == 3


@pytest.fixture(scope="module")
def user_database(private_pg):
    """A user's Postgres database (on the private server) with an orders table; a sequence counts
    statement attempts, since sequences survive the rollback of a dropped connection."""
    with postgres_database(private_pg.admin_url) as url:
        engine = create_engine(normalize_url(url))
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE orders (attempt bigint)"))
            conn.execute(text("CREATE SEQUENCE attempts"))
        yield url, engine
        engine.dispose()


def test_sql_insert_whose_connection_drops_not_retried(shared_world, report, user_database, private_pg):
    url, engine = user_database
    query = ("WITH a AS (SELECT nextval('attempts') AS n) "
             "INSERT INTO orders (attempt) SELECT n FROM a WHERE pg_terminate_backend(pg_backend_pid())")
    execution, outcome, row = _run(shared_world, report, "SQL querier INSERT whose connection drops", "sqlQuerier", {
        "dbms": "postgresql", "host": "127.0.0.1", "port": str(private_pg.port), "username": "postgres",
        "password": "", "database": url.rsplit("/", 1)[1], "query": query})
    with engine.connect() as conn:
        attempts = conn.execute(text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM attempts")).scalar()
    assert attempts == 1, f"the statement ran {attempts} times"
    assert row.status == "failed" and row.error and len(row.error) <= MAX_ERROR
