"""An agent (a flow of connected nodes, reference §8) as plain functions: load and validate the
graph, feed each node its upstream outputs, wait for a node's inputs, and settle the run.

Node state lives in ``node_executions`` rows (execId, nodeId), so every step of the agent run —
whichever process runs it — sees the same picture, and a re-execution sees what already completed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tenacity import Retrying

from flux_dagster.db.models import NodeExecution
from flux_dagster.errors import ExecutionCancelled, UserConfigError, classify
from flux_dagster.execution import (
    ExecutionRequest, NodeTask, cancel_requested, format_stack, merge_node_data, node_data, read_edges, read_nodes,
    record_node_cancelled, start_node_execution, write_execution_log,
)
from flux_dagster.failures import fail_node
from flux_dagster.node_types import NODE_TYPES, NodeServices
from flux_dagster.nodes import text_generator as tg

# sourceHandle → where the source node keeps that output (reference §4.1, §4.2 edge outputs).
OUTPUT_FIELD_BY_TYPE = {"scripting": "result", "mathFunction": "result"}
# targetHandle missing → the input a node of that type reads edge values from.
DEFAULT_INPUT_BY_TYPE = {"commandTextNode": "promptData", "outputController": "textData"}
SETTLED = ("COMPLETED", "FAILED", "CANCELLED")


def budget(name: str, default: int) -> int:
    """The original's execution budgets (reference §7), read when used so operators can tune them."""
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    source_handle: str | None
    target_handle: str | None


@dataclass(frozen=True)
class AgentNode:
    """One node of the agent run: what the node's step needs to start."""

    request: ExecutionRequest
    node_id: str
    node_type: str
    position: int  # topological position, also the order steps are handed to the executor
    incoming: tuple[Edge, ...] = ()
    flow_node_ids: tuple[str, ...] = ()  # every node of the run, to tell when the run settled

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.source for e in self.incoming))


@dataclass(frozen=True)
class FlowGraph:
    nodes: tuple[AgentNode, ...]

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]


def load_graph(session: Session, request: ExecutionRequest, known_types: set[str]) -> FlowGraph:
    """Load the flow (the published version the execution names, else the working copy) and
    reject, before any node runs, what cannot run as a whole."""
    nodes = {node_id: node_type for node_id, (node_type, _) in read_nodes(session, request).items()}
    if not nodes:
        raise UserConfigError(f"Flow {request.flow_id} has no nodes.")
    limit = budget("FLUX_MAX_RUN_NODE_EXECUTIONS", 50000)
    if len(nodes) > limit:
        raise UserConfigError(f"Stopped by system limit: the flow has {len(nodes)} nodes, the limit is {limit} "
                              "node executions per run (FLUX_MAX_RUN_NODE_EXECUTIONS).")
    unknown = sorted(f"{node_id} ({node_type})" for node_id, node_type in nodes.items() if node_type not in known_types)
    if unknown:
        raise UserConfigError("The flow has node types this worker does not support: " + ", ".join(unknown) + ".")
    edges = [Edge(e.source, e.target, e.source_handle, e.target_handle) for e in read_edges(session, request)]
    dangling = sorted({f"{e.source}→{e.target}" for e in edges if e.source not in nodes or e.target not in nodes})
    if dangling:
        raise UserConfigError("The flow has edges to nodes that do not exist: " + ", ".join(dangling) + ".")
    order = topological_order(list(nodes), edges)
    return FlowGraph(tuple(
        AgentNode(request=request, node_id=node_id, node_type=nodes[node_id], position=i,
                  incoming=tuple(e for e in edges if e.target == node_id), flow_node_ids=tuple(order))
        for i, node_id in enumerate(order)
    ))


def topological_order(node_ids: list[str], edges: list[Edge]) -> list[str]:
    """Kahn's algorithm, ties kept in the flow's own order; a cycle is a user error."""
    indegree = {n: 0 for n in node_ids}
    for e in edges:
        indegree[e.target] += 1
    ready = [n for n in node_ids if indegree[n] == 0]
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for e in edges:
            if e.source == node:
                indegree[e.target] -= 1
                if indegree[e.target] == 0:
                    ready.append(e.target)
    if len(order) != len(node_ids):
        cyclic = sorted(n for n in node_ids if n not in order)
        raise UserConfigError("The flow has a cycle through nodes " + ", ".join(cyclic) + ".")
    return order


def source_output(node_type: str, data: dict[str, Any], handle: str | None, session_id: str | None) -> Any:
    """The value an edge carries from its source node, by ``sourceHandle``."""
    handle = handle or "output"
    if handle == "output":
        return data.get(OUTPUT_FIELD_BY_TYPE.get(node_type, "text"))
    if handle == "fileLink":
        link = data.get("fileLink")
        return link.get("src") if isinstance(link, dict) else link
    if handle in ("logs", "console"):
        return data.get(handle)
    if handle == "output-memory":
        return json.dumps(tg.filter_memories(tg.session_memories(data, session_id), data))
    raise UserConfigError(f"Unknown edge output {handle!r}.")


def input_field(target_type: str, handle: str | None) -> str | None:
    """The ``*Data`` input an edge feeds, by ``targetHandle`` (``prompt`` → ``promptData``)."""
    if not handle:
        return DEFAULT_INPUT_BY_TYPE.get(target_type)
    return handle if handle.endswith("Data") else f"{handle}Data"


def propagate_inputs(session: Session, node: AgentNode) -> NodeTask:
    """Add each incoming edge's value to the node's ``*Data`` input, replacing the item that
    edge put there before (so re-runs do not pile up), then return the node ready to run.

    A source's value is read from what it produced in this execution (``node_executions.outputData``)
    over its node data, so a run of a published version reads its own outputs too."""
    request = node.request
    nodes = read_nodes(session, request, [node.node_id, *node.upstream])
    outputs = {r.nodeId: r.outputData or {} for r in session.scalars(
        select(NodeExecution).where(NodeExecution.execId == request.exec_id, NodeExecution.nodeId.in_(node.upstream)))}
    target_type, target_data = nodes[node.node_id]
    data = node_data(node.node_id, target_data)
    updates: dict[str, list] = {}
    max_items = budget("FLUX_MAX_ARRAY_ITEMS", 12000)
    for edge in node.incoming:
        field_name = input_field(target_type, edge.target_handle)
        if field_name is None:
            continue
        source_type, source_data = nodes[edge.source]
        source_data = {**node_data(edge.source, source_data), **outputs.get(edge.source, {})}
        value = source_output(source_type, source_data, edge.source_handle, request.session_id)
        if value is None:
            continue
        items = [i for i in updates.get(field_name, data.get(field_name) or [])
                 if not (isinstance(i, dict) and i.get("id") == edge.source)]
        items.append({"id": edge.source, "text": value if isinstance(value, str) else json.dumps(value),
                      "label": source_data.get("label")})
        if len(items) > max_items:
            raise UserConfigError(f"Stopped by system limit: {field_name} would hold more than {max_items} items "
                                  "(FLUX_MAX_ARRAY_ITEMS).")
        updates[field_name] = items
    task = NodeTask(request=request, node_id=node.node_id, node_type=target_type, data={**data, **updates})
    if updates:
        merge_node_data(session, task, updates)
    return task


@dataclass(frozen=True)
class NodeState:
    status: str | None  # node_executions.status, None when the node has no row yet
    run_id: str | None  # the Dagster run that last wrote it
    not_executed: bool = False


def node_states(session: Session, exec_id: str, node_ids: list[str]) -> dict[str, NodeState]:
    rows = session.scalars(select(NodeExecution).where(NodeExecution.execId == exec_id,
                                                       NodeExecution.nodeId.in_(node_ids)))
    return {r.nodeId: NodeState(r.status, (r.metadata_ or {}).get("dagsterRunId"),
                                bool((r.metadata_ or {}).get("notExecuted"))) for r in rows}


def settled_here(state: NodeState | None, dagster_run_id: str) -> bool:
    """Done for this run: completed by any run (a re-execution keeps it), or ended by this one."""
    return state is not None and (state.status == "COMPLETED" or
                                  (state.status in SETTLED and state.run_id == dagster_run_id))


@dataclass(frozen=True)
class Readiness:
    ready: bool
    blocked_by: tuple[str, ...] = ()  # upstream nodes that did not complete
    cancelled: bool = False


def wait_for_inputs(sessions: Callable[[], Any], node: AgentNode, dagster_run_id: str, *,
                    poll_s: float = 0.1, timeout_s: float = 3600.0, sleep=time.sleep) -> Readiness:
    """Block until every upstream node settled in this run, or the agent is cancelled."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sessions() as session:
            if cancel_requested(session, node.request.pending_execution_id):
                return Readiness(False, cancelled=True)
            states = node_states(session, node.request.exec_id, list(node.upstream))
        if all(settled_here(states.get(u), dagster_run_id) for u in node.upstream):
            blocked = tuple(u for u in node.upstream if states[u].status != "COMPLETED")
            return Readiness(not blocked, blocked_by=blocked)
        if time.monotonic() > deadline:
            raise UserConfigError(f"Node {node.node_id} waited over {timeout_s:.0f}s for its inputs.")
        sleep(poll_s)


@dataclass
class AgentSummary:
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_executed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.failed or self.not_executed:
            return "failed"
        return "cancelled" if self.cancelled else "completed"

    def message(self) -> str:
        parts = [f"{len(self.completed)} completed"]
        for name, ids in (("failed", self.failed), ("not executed", self.not_executed), ("cancelled", self.cancelled)):
            if ids:
                parts.append(f"{len(ids)} {name} ({', '.join(ids)})")
        return "Agent run: " + ", ".join(parts) + "."

    def as_dict(self) -> dict[str, list[str]]:
        return {"completed": self.completed, "failed": self.failed, "notExecuted": self.not_executed,
                "cancelled": self.cancelled}


def summary_if_settled(session: Session, exec_id: str, node_ids: list[str], dagster_run_id: str) -> AgentSummary | None:
    """The run's summary once every node settled in this run, else None."""
    states = node_states(session, exec_id, node_ids)
    if not all(settled_here(states.get(n), dagster_run_id) for n in node_ids):
        return None
    summary = AgentSummary()
    for node_id in node_ids:
        state = states[node_id]
        bucket = {"COMPLETED": summary.completed, "FAILED": summary.failed}.get(state.status)
        if bucket is None:
            bucket = summary.not_executed if state.not_executed else summary.cancelled
        bucket.append(node_id)
    return summary


def run_agent_node(services: NodeServices, node: AgentNode, *, retry: Retrying, poll_s: float = 0.1) -> tuple[str, str | None]:
    """One node of an agent run, through the node type's own stages (the same code as
    ``process_single_node``'s ops): returns (COMPLETED | FAILED | CANCELLED | NOT_EXECUTED, message)."""
    run_id = services.dagster_run_id
    request = node.request
    readiness = wait_for_inputs(services.sessions, node, run_id, poll_s=poll_s)
    with services.sessions() as session:
        state = node_states(session, request.exec_id, [node.node_id]).get(node.node_id)
        placeholder = NodeTask(request=request, node_id=node.node_id, node_type=node.node_type, data={})
        if readiness.cancelled or readiness.blocked_by:
            not_executed = not readiness.cancelled
            reason = ("Not executed: the agent run was cancelled." if readiness.cancelled else
                      "Not executed: upstream node(s) " + ", ".join(readiness.blocked_by) + " did not complete.")
            record_node_cancelled(session, placeholder, reason, dagster_run_id=run_id, not_executed=not_executed)
    if readiness.cancelled or readiness.blocked_by:
        services.notifier.publish(request, node.node_id, "CANCELLED", reason)
        return ("NOT_EXECUTED" if not_executed else "CANCELLED"), reason
    if state is not None and state.status == "COMPLETED":
        return "COMPLETED", "Completed by an earlier run of this execution: not run or charged again."

    services.notifier.publish(request, node.node_id, "PENDING")
    task = placeholder
    try:
        with services.sessions() as session:
            task = propagate_inputs(session, node)
            start_node_execution(session, task, run_id)
        outcome = retry(NODE_TYPES[node.node_type].run, services, task)
    except ExecutionCancelled as exc:  # stopped while running; the node settled its partial work
        with services.sessions() as session:
            record_node_cancelled(session, task, exc.user_message, dagster_run_id=run_id)
        services.notifier.publish(request, node.node_id, "CANCELLED", exc.user_message)
        return "CANCELLED", exc.user_message
    except Exception as exc:
        error = classify(exc)
        with services.sessions() as session:
            start_node_execution(session, task, run_id)  # stamps this run even when loading inputs failed
            fail_node(session, request, node.node_id, task, error, format_stack(exc))
        services.notifier.publish(request, node.node_id, "FAILED", error.user_message)
        return "FAILED", error.user_message
    with services.sessions() as session:
        write_execution_log(session, request, node.node_id, message=outcome.message, metadata=task.data)
    services.notifier.publish(request, node.node_id, "COMPLETED")
    return "COMPLETED", outcome.message
