"""Shared fixtures: the app DB on SQLite and on the machine's Postgres, loopback fakes, and a way
to run ``process_single_node`` in-process for one queued execution."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

os.environ.setdefault("FLUX_RETRY_DELAY_SCALE", "0.01")  # read when the ops module is imported
os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")

import pytest
from sqlalchemy import create_engine, text

from flux_dagster.db.engine import create_schema, normalize_url
from flux_dagster.db.models import AppBase, OwnBase

PG_ADMIN_URL = os.environ.get("FLUX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_url(db_name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's Postgres for this test session."""
    name = f"flux_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = _pg_url(name)
    create_schema(url)
    yield url
    from flux_dagster.db.engine import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate(url: str) -> None:
    from flux_dagster.db.engine import get_engine

    tables = [t.name for t in (*AppBase.metadata.sorted_tables, *OwnBase.metadata.sorted_tables)]
    with get_engine(url).begin() as conn:
        conn.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"))


def _seeded(url: str) -> str:
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope

    with session_scope(url) as session:
        demo.seed(session)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def app_db_url(request, tmp_path) -> str:
    """The app DB, once on SQLite and once on Postgres, with the full schema and demo models."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
        create_schema(url)
    else:
        url = request.getfixturevalue("postgres_url")
        _truncate(url)
    return _seeded(url)


@pytest.fixture
def sqlite_app_db_url(tmp_path) -> str:
    """The app DB on SQLite only (schema and demo models), for tests whose subject is not SQL."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    create_schema(url)
    return _seeded(url)


@pytest.fixture
def fake_llm():
    from flux_dagster_tests.fakes.llm import FakeLlm

    with FakeLlm() as server:
        yield server


@pytest.fixture
def fake_main_api():
    from flux_dagster_tests.fakes.main_api import FakeMainApi

    with FakeMainApi() as server:
        yield server


def make_resources(app_db_url: str, *, llm_url: str | None = None, main_api=None, redis_url: str | None = None,
                   **extra: Any) -> dict[str, Any]:
    """Resources as ``build_resources`` makes them, pointed at the test's DB and fakes."""
    import tempfile

    from flux_dagster.files.resource import FileStoreResource
    from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource, MediaApisResource, NotifierResource
    from flux_dagster.scripting.resource import ScriptRunnerResource

    database = AppDatabase(url=app_db_url)
    llm = (
        LlmResource(offline=False, openai_api_key="sk-test", openai_base_url=f"{llm_url}/v1",
                    anthropic_api_key="sk-ant-test", anthropic_base_url=llm_url,
                    groq_api_key="gsk-test", groq_base_url=f"{llm_url}/openai/v1", timeout_s=10)
        if llm_url else LlmResource(offline=True)
    )
    return {
        "app_db": database,
        "main_api": MainApiResource(database_url=database.url, url=main_api.url if main_api else None,
                                    api_key=main_api.api_key if main_api else None),
        "notifier": NotifierResource(database_url=database.url, redis_url=redis_url),
        "llm": llm,
        "file_store": FileStoreResource(local_root=tempfile.mkdtemp(prefix="flux-files-")),
        "script_runner": ScriptRunnerResource(mode="local"),
        "media_apis": MediaApisResource(),
        **extra,
    }


@dataclass
class Executed:
    result: Any
    pending_id: int
    exec_id: str


def add_node(app_db_url: str, node_type: str, data: dict, *, flow_id: str | None = None, node_id: str | None = None) -> tuple[str, str]:
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import Flow, FlowNode

    flow_id = flow_id or str(uuid.uuid4())
    node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
    with session_scope(app_db_url) as session:
        if session.get(Flow, flow_id) is None:
            session.add(Flow(id=flow_id, name="test flow", userId="user-1"))
        session.add(FlowNode(flowId=flow_id, nodeId=node_id, type=node_type, data=data))
    return flow_id, node_id


def execute_node(app_db_url: str, resources: dict, flow_id: str, node_id: str, *, instance=None,
                 session_id: str | None = "session-1", user_id: str = "user-1") -> Executed:
    """Queue one execution, claim it as the sensor does, and run its job in-process."""
    from dagster import DagsterInstance

    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope
    from flux_dagster.jobs.process_single_node import process_single_node
    from flux_dagster.sensors.pending_executions import run_request_for

    exec_id = str(uuid.uuid4())
    with session_scope(app_db_url) as session:
        row = queue.enqueue(session, kind="node", exec_id=exec_id, flow_id=flow_id, node_id=node_id,
                            user_id=user_id, session_id=session_id)
        pending_id = row.id
    with session_scope(app_db_url) as session:
        claimed = [r for r in queue.claim_batch(session, 100, timedelta(seconds=60)) if r.id == pending_id]
        request = run_request_for(claimed[0], None)
    result = process_single_node.execute_in_process(
        run_config=request.run_config, tags=request.tags, resources=resources,
        instance=instance or DagsterInstance.ephemeral(), raise_on_error=False,
    )
    return Executed(result=result, pending_id=pending_id, exec_id=exec_id)


def add_flow(app_db_url: str, nodes: dict[str, tuple[str, dict]], edges: list[tuple]) -> str:
    """A flow: ``nodes`` id → (type, data); ``edges`` (source, target[, sourceHandle[, targetHandle]])."""
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import FlowEdge

    flow_id = str(uuid.uuid4())
    for node_id, (node_type, data) in nodes.items():
        add_node(app_db_url, node_type, data, flow_id=flow_id, node_id=node_id)
    with session_scope(app_db_url) as session:
        for i, edge in enumerate(edges):
            source, target, source_handle, target_handle = (*edge, None, None)[:4]
            session.add(FlowEdge(flowId=flow_id, edgeId=f"e{i:03d}", source=source, target=target,
                                 sourceHandle=source_handle, targetHandle=target_handle))
    return flow_id


def enqueue_agent(app_db_url: str, flow_id: str, **fields: Any) -> tuple[int, str]:
    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope

    exec_id = str(uuid.uuid4())
    with session_scope(app_db_url) as session:
        row = queue.enqueue(session, kind="agent", exec_id=exec_id, flow_id=flow_id, user_id="user-1",
                            session_id="session-1", run_id=f"run-{exec_id[:8]}", **fields)
        return row.id, exec_id


def agent_run_request(app_db_url: str, pending_id: int):
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution
    from flux_dagster.sensors.pending_executions import run_request_for

    with session_scope(app_db_url) as session:
        return run_request_for(session.get(PendingExecution, pending_id), None)


def execute_agent(app_db_url: str, resources: dict, flow_id: str, *, instance=None) -> Executed:
    """Queue an agent execution and run ``process_agent`` in-process (steps in topological order)."""
    from dagster import DagsterInstance

    from flux_dagster.jobs.process_agent import process_agent

    pending_id, exec_id = enqueue_agent(app_db_url, flow_id)
    request = agent_run_request(app_db_url, pending_id)
    result = process_agent.execute_in_process(
        run_config=request.run_config, tags=request.tags, resources=resources,
        instance=instance or DagsterInstance.ephemeral(), raise_on_error=False,
    )
    return Executed(result=result, pending_id=pending_id, exec_id=exec_id)


def rows(url: str, model, **filters) -> list:
    from sqlalchemy import select

    from flux_dagster.db.engine import session_scope

    with session_scope(url) as session:
        return list(session.scalars(select(model).filter_by(**filters)))


def node_data(url: str, node_id: str) -> Any:
    from flux_dagster.db.models import FlowNode

    return rows(url, FlowNode, nodeId=node_id)[0].data


def execution(url: str, exec_id: str):
    from flux_dagster.db.models import NodeExecution

    found = rows(url, NodeExecution, execId=exec_id)
    return found[0] if found else None


def assert_failed(url: str, run: Executed, node_id: str, message: str) -> Any:
    """The error path ran once: row failed with the message, one error log with the stack, one
    FAILED notification, and the node (when its data could be read) says FAILED."""
    from flux_dagster.db.models import ExecutionLog, PendingExecution, StatusNotification

    assert not run.result.success
    [row] = rows(url, PendingExecution, id=run.pending_id)
    assert row.status == "failed" and message in row.error, row.error
    [log] = rows(url, ExecutionLog, nodeId=node_id)
    assert log.isError and message in log.message and "Traceback" in log.errorStack
    failed = [n.payload["nodes"][node_id] for n in rows(url, StatusNotification, exec_id=run.exec_id)
              if n.payload["nodes"].get(node_id, {}).get("status") == "FAILED"]
    assert len(failed) == 1 and message in failed[0]["userMessage"]
    data = node_data(url, node_id)
    if isinstance(data, dict):
        assert data["executionStatus"] == "FAILED" and message in data["errorMessage"]
    return data
