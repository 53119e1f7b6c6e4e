"""``process_agent``'s ops: load the flow, then one step per node (dynamic mapping)."""

import re

from dagster import DynamicOut, DynamicOutput, Failure, OpExecutionContext, op

from flux_dagster import agent, queue
from flux_dagster.execution import ExecutionRequest
from flux_dagster.files.resource import FileStoreResource
from flux_dagster.node_types import NODE_TYPES, NodeServices
from flux_dagster.ops.guards import running_elsewhere
from flux_dagster.ops.lifecycle import ExecutionParams
from flux_dagster.ops.retries import RETRY_POLICIES, agent_retrying, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource, MediaApisResource, NotifierResource
from flux_dagster.scripting.resource import ScriptRunnerResource


def mapping_key(node: agent.AgentNode) -> str:
    # Zero-padded position first: the executor starts steps in this order, which is topological,
    # so a step only ever waits for steps that already started.
    return f"{node.position:05d}_" + re.sub(r"[^A-Za-z0-9_]", "_", node.node_id)[:60]


@op(out=DynamicOut(agent.AgentNode), retry_policy=RETRY_POLICIES["get_info_in_database"])
def load_flow(context: OpExecutionContext, config: ExecutionParams, app_db: AppDatabase):
    """Load and validate the whole graph before any node runs."""
    request = ExecutionRequest(kind="agent", **config.model_dump())
    with node_errors():
        with app_db.session() as session:
            if (other := running_elsewhere(context, session, config.pending_execution_id)) is not None:
                context.log.warning(f"Run {other} is already executing this execution: this run does nothing.")
                return
            queue.mark_running(session, config.pending_execution_id, context.run_id)
        with app_db.session() as session:
            graph = agent.load_graph(session, request, set(NODE_TYPES))
    context.log.info(f"Agent flow {request.flow_id}: {len(graph.nodes)} nodes in order {graph.node_ids}")
    for node in graph.nodes:
        yield DynamicOutput(node, mapping_key=mapping_key(node))


@op
def run_agent_node(
    context: OpExecutionContext,
    node: agent.AgentNode,
    app_db: AppDatabase,
    main_api: MainApiResource,
    llm: LlmResource,
    notifier: NotifierResource,
    file_store: FileStoreResource,
    script_runner: ScriptRunnerResource,
    media_apis: MediaApisResource,
) -> str:
    """Wait for the node's inputs, run it, and settle the agent when it is the last to finish.

    A node that failed, was not executed or was cancelled fails its step, so "re-execute from
    failure" in the UI runs exactly those again; completed nodes are never re-run or re-charged."""
    services = NodeServices(
        database_url=app_db.url, main_api=main_api.client(), llm=llm.client(), notifier=notifier.client(),
        file_store=file_store.store(), script_runner=script_runner.runner(), dagster_run_id=context.run_id,
        media=media_apis.client(),
    )
    policy = RETRY_POLICIES["agent_node"]
    status, message = agent.run_agent_node(services, node, retry=agent_retrying(policy, log=context.log.warning))
    context.log.info(f"node {node.node_id} ({node.node_type}): {status} — {message}")
    with app_db.session() as session:
        summary = agent.summary_if_settled(session, node.request.exec_id, list(node.flow_node_ids), context.run_id)
        if summary is not None and queue.finish(session, node.request.pending_execution_id, context.run_id,
                                                summary.status, None if summary.status == "completed" else summary.message()):
            context.log.info(summary.message())
    if status != "COMPLETED":
        raise Failure(description=message, allow_retries=False)
    return status
