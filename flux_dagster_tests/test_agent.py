"""``process_agent``: whole flows through the per-node code of ``process_single_node``."""

import threading
import time

import pytest
from sqlalchemy import select, update

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import ExecutionLog, FlowNode, NodeExecution, PendingExecution, StatusNotification, TokenLedgerEntry, utcnow
from flux_dagster_tests.conftest import add_flow, execute_agent, make_resources

TEXT = ("commandTextNode", {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Go."})


def math(formula="1 + 1"):
    return ("mathFunction", {"formula": formula, "variables": []})


def states(url, exec_id):
    with session_scope(url) as s:
        return {r.nodeId: (r.status, (r.metadata_ or {}).get("notExecuted", False))
                for r in s.scalars(select(NodeExecution).where(NodeExecution.execId == exec_id))}


def node_data(url, flow_id, node_id):
    with session_scope(url) as s:
        return s.scalar(select(FlowNode.data).where(FlowNode.flowId == flow_id, FlowNode.nodeId == node_id))


def pending(url, pending_id):
    with session_scope(url) as s:
        return s.get(PendingExecution, pending_id)


def test_chain_propagates_outputs_into_the_next_inputs(app_db_url):
    flow_id = add_flow(app_db_url, {"calc": math("6 * 7"), "write": TEXT,
                                    "show": ("outputController", {"text": ""})},
                       [("calc", "write", "output", "prompt"), ("write", "show", "output", "text")])
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert run.result.success
    assert states(app_db_url, run.exec_id) == {n: ("COMPLETED", False) for n in ("calc", "write", "show")}
    assert node_data(app_db_url, flow_id, "write")["promptData"] == [{"id": "calc", "text": "42", "label": None}]
    written = node_data(app_db_url, flow_id, "write")["text"]
    assert "42" in written  # the offline model echoes its prompt
    assert node_data(app_db_url, flow_id, "show")["textData"][0]["text"] == written
    row = pending(app_db_url, run.pending_id)
    assert row.status == "completed" and row.dagster_run_id == run.result.run_id
    with session_scope(app_db_url) as s:
        assert s.query(TokenLedgerEntry).filter_by(exec_id=run.exec_id).count() == 1
        assert s.query(ExecutionLog).filter_by(isError=False).count() == 3
        notes = [n.payload["nodes"] for n in s.scalars(select(StatusNotification).where(StatusNotification.exec_id == run.exec_id))]
    assert [list(n.items())[0] for n in notes] == [(node, {"status": st}) for node in ("calc", "write", "show")
                                                  for st in ("PENDING", "COMPLETED")]
    # one step per node, visible in the UI
    steps = {e.step_key for e in run.result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert {"run_agent_node[00000_calc]", "run_agent_node[00001_write]", "run_agent_node[00002_show]"} <= steps


def test_diamond_fans_out_and_in(app_db_url):
    flow_id = add_flow(app_db_url, {"a": math("2"), "b": math("{{x}} 3"), "c": math("4"), "d": TEXT},
                       [("a", "b"), ("a", "c"), ("b", "d", "output", "content"), ("c", "d", "output", "content")])
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert not run.result.success  # b's formula is bad on purpose
    assert states(app_db_url, run.exec_id) == {"a": ("COMPLETED", False), "b": ("FAILED", False),
                                               "c": ("COMPLETED", False), "d": ("CANCELLED", True)}
    row = pending(app_db_url, run.pending_id)
    assert row.status == "failed"
    assert row.error == "Agent run: 2 completed, 1 failed (b), 1 not executed (d)."


def test_fan_in_collects_every_upstream_output(app_db_url):
    flow_id = add_flow(app_db_url, {"a": math("1"), "b": math("2"), "c": math("3"), "d": TEXT},
                       [("a", "d", "output", "content"), ("b", "d", "output", "content"), ("c", "d", "output", "content")])
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert run.result.success
    assert [i["text"] for i in node_data(app_db_url, flow_id, "d")["contentData"]] == ["1", "2", "3"]


def test_failing_middle_node_fails_downstream_and_independent_branches_finish(app_db_url):
    flow_id = add_flow(app_db_url, {"a": math("1"), "b": math("1 +* 2"), "c": math("3"), "x": math("5"), "y": math("6")},
                       [("a", "b"), ("b", "c"), ("x", "y")])
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert not run.result.success
    assert states(app_db_url, run.exec_id) == {"a": ("COMPLETED", False), "b": ("FAILED", False),
                                               "c": ("CANCELLED", True), "x": ("COMPLETED", False),
                                               "y": ("COMPLETED", False)}
    with session_scope(app_db_url) as s:
        c = s.scalar(select(NodeExecution).where(NodeExecution.execId == run.exec_id, NodeExecution.nodeId == "c"))
        assert c.output == "Not executed: upstream node(s) b did not complete."
        [error_log] = s.scalars(select(ExecutionLog).where(ExecutionLog.isError)).all()
        assert error_log.nodeId == "b"


@pytest.mark.parametrize("nodes,edges,message", [
    ({"a": math(), "b": math()}, [("a", "b"), ("b", "a")], "cycle through nodes a, b"),
    ({"a": math()}, [("a", "ghost")], "edges to nodes that do not exist: a→ghost"),
    ({"a": math(), "w": ("weatherNode", {})}, [("a", "w")], "does not support: w (weatherNode)"),
])
def test_invalid_graphs_are_rejected_before_any_node_runs(app_db_url, nodes, edges, message):
    flow_id = add_flow(app_db_url, nodes, edges)
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert not run.result.success
    assert states(app_db_url, run.exec_id) == {}
    row = pending(app_db_url, run.pending_id)
    assert row.status == "failed" and message in row.error


def test_node_budget_is_enforced(app_db_url, monkeypatch):
    monkeypatch.setenv("FLUX_MAX_RUN_NODE_EXECUTIONS", "2")
    flow_id = add_flow(app_db_url, {"a": math(), "b": math(), "c": math()}, [])
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert "limit is 2 node executions per run" in pending(app_db_url, run.pending_id).error
    assert states(app_db_url, run.exec_id) == {}


def test_fifty_node_flow(app_db_url):
    nodes = {f"n{i:02d}": math(f"{i} + 1") for i in range(50)}
    edges = [(f"n{i:02d}", f"n{i + 1:02d}") for i in range(0, 49, 2)] + [(f"n{i:02d}", f"n{i + 2:02d}") for i in range(0, 48, 5)]
    flow_id = add_flow(app_db_url, nodes, edges)
    run = execute_agent(app_db_url, make_resources(app_db_url), flow_id)
    assert run.result.success
    assert set(states(app_db_url, run.exec_id).values()) == {("COMPLETED", False)}
    assert len(states(app_db_url, run.exec_id)) == 50


def test_cancellation_mid_run_stops_before_the_next_nodes(app_db_url):
    flow_id = add_flow(app_db_url, {"a": math(), "wait": ("counterNode", {"counterMode": "wait", "waitSeconds": 3, "text": "1"}),
                                    "b": math(), "c": math()},
                       [("a", "wait"), ("wait", "b"), ("b", "c")])
    result = {}
    thread = threading.Thread(target=lambda: result.update(run=execute_agent(app_db_url, make_resources(app_db_url), flow_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        with session_scope(app_db_url) as s:
            running = s.scalar(select(NodeExecution).where(NodeExecution.nodeId == "wait", NodeExecution.status == "RUNNING"))
        if running is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with session_scope(app_db_url) as s:
        s.execute(update(PendingExecution).values(cancel_requested_at=utcnow()))
    thread.join(120)
    run = result["run"]
    assert states(app_db_url, run.exec_id) == {"a": ("COMPLETED", False), "wait": ("COMPLETED", False),
                                               "b": ("CANCELLED", False), "c": ("CANCELLED", False)}
    row = pending(app_db_url, run.pending_id)
    assert row.status == "cancelled"
