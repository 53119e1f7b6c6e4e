"""End to end through a real ``dagster-daemon`` and code server: rows inserted in the app DB become
runs and finish, once each, on SQLite and on Postgres (app DB and Dagster storage)."""

import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import select

from flux_dagster import queue
from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import ExecutionLog, PendingExecution, StatusNotification, TokenLedgerEntry
from flux_dagster_tests.conftest import add_node
# BIN, deployment, free_port, postgres_database, runs_by_row, wait_terminal: other test modules import them from here.
from flux_dagster_tests.deployment import (  # noqa: F401
    BIN, REPO, deployment, free_port, postgres_database, runs_by_row, wait_terminal,
)

pytestmark = pytest.mark.e2e

OPENAI_NODE = {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Say hi."}


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        app_url = f"sqlite:///{tmp_path / 'app.db'}"
        from flux_dagster.db.engine import create_schema

        create_schema(app_url)
        yield app_url, {}
    else:
        with postgres_database() as app_url, postgres_database() as dagster_url:
            from flux_dagster.db.engine import create_schema

            create_schema(app_url)
            yield app_url, {"DAGSTER_PG_URL": dagster_url}
            from flux_dagster.db.engine import get_engine

            get_engine(app_url).dispose()


def test_rows_become_runs_and_finish_once(storage, tmp_path, fake_llm, fake_main_api):
    app_url, storage_env = storage
    from flux_dagster import demo

    with session_scope(app_url) as s:
        demo.seed(s)
    fake_main_api.denied_models.add("o4-mini")
    flow_id, ok_node = add_node(app_url, "commandTextNode", OPENAI_NODE)
    _, denied_node = add_node(app_url, "commandTextNode", {"AiSystem": "openai", "aiModel": "o4-mini"}, flow_id=flow_id)
    _, unknown_node = add_node(app_url, "weatherNode", {}, flow_id=flow_id)
    env_extra = {**storage_env, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{fake_llm.url}/v1",
                 "URL_MAIN_API": fake_main_api.url, "INTERNAL_API_KEY": fake_main_api.api_key}

    def insert(node_id, **extra):
        with session_scope(app_url) as s:
            return queue.enqueue(s, kind=extra.pop("kind", "node"), exec_id=str(uuid.uuid4()), flow_id=flow_id,
                                 node_id=node_id, user_id="user-1", session_id="s", **extra).id

    with deployment(tmp_path, app_url, env_extra) as env:
        first = insert(ok_node)
        inserted_at = time.monotonic()
        wait_terminal(app_url, [first])
        print(f"\ninsert -> COMPLETED for one execution: {time.monotonic() - inserted_at:.2f}s")
        ids = [insert(ok_node) for _ in range(3)] + [insert(denied_node), insert(unknown_node), insert(None),
                                                      insert(ok_node, kind="robot")]
        rows = wait_terminal(app_url, [first, *ids])
        runs = runs_by_row(env)

    ok_ids = [first, *ids[:3]]
    assert [rows[i].status for i in ok_ids] == ["completed"] * 4
    assert rows[ids[3]].status == "failed" and "No access to o4-mini" in rows[ids[3]].error
    assert rows[ids[4]].status == "failed" and "'weatherNode' is not supported" in rows[ids[4]].error
    assert rows[ids[5]].status == "failed" and "missing node_id" in rows[ids[5]].error
    assert rows[ids[6]].status == "failed" and "Unknown execution kind" in rows[ids[6]].error
    # exactly one run per launchable row, none for malformed rows
    assert runs == {str(i): ["SUCCESS"] for i in ok_ids} | {str(ids[3]): ["FAILURE"], str(ids[4]): ["FAILURE"]}
    # one charge per completed execution, no double charge
    assert len(fake_main_api.charges) == 4 and len(fake_main_api.calls("/worker/charge-tokens")) == 4
    with session_scope(app_url) as s:
        assert s.scalar(select(TokenLedgerEntry).where(TokenLedgerEntry.state != "charged")) is None
        error_logs = s.scalars(select(ExecutionLog).where(ExecutionLog.isError)).all()
        assert sorted(log.nodeId for log in error_logs) == sorted([denied_node, unknown_node])
        failed = [n for n in s.scalars(select(StatusNotification)) if "FAILED" in str(n.payload["nodes"])]
        assert len(failed) == 4  # two runs failed, two rows could not become runs


REEXECUTE_FROM_FAILURE = (
    "import sys\n"
    "from dagster import DagsterInstance, ReexecutionOptions, execute_job, reconstructable\n"
    "from flux_dagster_tests.test_e2e_daemon import agent_job\n"
    "with DagsterInstance.get() as instance:\n"
    "    result = execute_job(reconstructable(agent_job), instance,\n"
    "                         reexecution_options=ReexecutionOptions.from_failure(sys.argv[1], instance))\n"
    "    print('REEXECUTED', result.run_id, result.success)\n"
)


def agent_job():
    from flux_dagster.definitions import defs

    return defs.get_job_def("process_agent")


def test_agent_runs_then_reexecution_from_failure_skips_completed_nodes(storage, tmp_path, fake_llm, fake_main_api):
    """An agent with a failing middle node: the branch after it is not executed, the other branch
    finishes; after the node is fixed, "re-execute from failure" (what the UI launches) runs only
    what did not complete, and the completed text generator is neither re-run nor re-charged."""
    from sqlalchemy import update

    from flux_dagster import demo
    from flux_dagster.db.models import FlowNode, NodeExecution
    from flux_dagster_tests.conftest import add_flow, enqueue_agent

    app_url, storage_env = storage
    with session_scope(app_url) as s:
        demo.seed(s)
    math = lambda f: ("mathFunction", {"formula": f, "variables": []})  # noqa: E731
    flow_id = add_flow(app_url, {"write": ("commandTextNode", OPENAI_NODE), "calc": math("1 +* 2"), "after": math("3"),
                                 "x": math("4"), "y": math("5"), "z": math("6")},
                       [("write", "calc"), ("calc", "after"), ("x", "y"), ("x", "z")])
    env_extra = {**storage_env, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{fake_llm.url}/v1",
                 "URL_MAIN_API": fake_main_api.url, "INTERNAL_API_KEY": fake_main_api.api_key}

    def node_states(exec_id):
        with session_scope(app_url) as s:
            return {r.nodeId: r.status for r in s.scalars(select(NodeExecution).where(NodeExecution.execId == exec_id))}

    with deployment(tmp_path, app_url, env_extra) as env:
        pending_id, exec_id = enqueue_agent(app_url, flow_id)
        row = wait_terminal(app_url, [pending_id])[pending_id]
        assert row.status == "failed"
        assert row.error == "Agent run: 4 completed, 1 failed (calc), 1 not executed (after)."
        assert node_states(exec_id) == {"write": "COMPLETED", "calc": "FAILED", "after": "CANCELLED",
                                        "x": "COMPLETED", "y": "COMPLETED", "z": "COMPLETED"}
        assert runs_by_row(env) == {str(pending_id): ["FAILURE"]}

        with session_scope(app_url) as s:
            s.execute(update(FlowNode).where(FlowNode.flowId == flow_id, FlowNode.nodeId == "calc")
                      .values(data={"formula": "1 + 2", "variables": []}))
        done = subprocess.run([sys.executable, "-c", REEXECUTE_FROM_FAILURE, row.dagster_run_id], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert "REEXECUTED" in done.stdout and done.stdout.strip().endswith("True"), done.stdout + done.stderr[-3000:]
        row = wait_terminal(app_url, [pending_id])[pending_id]

    assert row.status == "completed"
    assert set(node_states(exec_id).values()) == {"COMPLETED"}
    assert len([r for r in fake_llm.requests if r.path.endswith("/chat/completions")]) == 1
    assert len(fake_main_api.charges) == 1 and len(fake_main_api.calls("/worker/charge-tokens")) == 1


def test_cancelling_a_running_node_execution_terminates_its_run(tmp_path, fake_llm):
    """``cancel_requested_at`` on a running node row: the sensor terminates the run (as the UI's
    Terminate does) and the row, node and notifications end CANCELLED, not FAILED."""
    from sqlalchemy import update

    from flux_dagster import demo
    from flux_dagster.db.engine import create_schema
    from flux_dagster.db.models import NodeExecution, utcnow

    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    create_schema(app_url)
    with session_scope(app_url) as s:
        demo.seed(s)
    fake_llm.latency_s = 60  # a provider that does not answer before the cancellation
    flow_id, node_id = add_node(app_url, "commandTextNode", OPENAI_NODE)
    env_extra = {"OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{fake_llm.url}/v1"}
    with deployment(tmp_path, app_url, env_extra) as env:
        with session_scope(app_url) as s:
            pending_id = queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                                       user_id="user-1").id
        deadline = time.monotonic() + 120
        while not [r for r in fake_llm.requests if r.path.endswith("/chat/completions")]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with session_scope(app_url) as s:
            s.execute(update(PendingExecution).values(cancel_requested_at=utcnow()))
        row = wait_terminal(app_url, [pending_id])[pending_id]
        runs = runs_by_row(env)
    assert row.status == "cancelled"
    assert runs == {str(pending_id): ["CANCELED"]}
    with session_scope(app_url) as s:
        execution = s.scalar(select(NodeExecution).where(NodeExecution.nodeId == node_id))
        assert execution.status == "CANCELLED"
        assert s.scalar(select(ExecutionLog).where(ExecutionLog.isError)) is None
        statuses = [list(n.payload["nodes"].values())[0]["status"] for n in s.scalars(select(StatusNotification))]
    assert statuses == ["PENDING", "CANCELLED"]
