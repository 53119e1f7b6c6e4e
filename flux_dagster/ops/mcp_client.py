"""The MCP client branch (reference §4.10): list, choose and call, then charge, as two steps so a
retried charge never calls the tool (or the model) again."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes import mcp_client as mc
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource


@op(retry_policy=RETRY_POLICIES["mcp_client"])
def mcp_client(context: OpExecutionContext, task: NodeTask, llm: LlmResource, main_api: MainApiResource) -> mc.McpCall:
    with node_errors():
        call = mc.choose_and_call(task, llm=llm.client(), main_api=main_api.client(),
                                  # The run that chose: retries and re-executions reuse this output, hence the same key.
                                  generation_id=f"{context.run_id}/{context.op_handle}")
    context.add_output_metadata({"tool": call.tool, "transport": call.transport, "failed": call.error is not None,
                                 "input_tokens": call.input_tokens, "output_tokens": call.output_tokens})
    return call


@op(retry_policy=RETRY_POLICIES["charge_mcp_tokens"])
def charge_mcp_tokens(
    context: OpExecutionContext, task: NodeTask, call: mc.McpCall, app_db: AppDatabase, main_api: MainApiResource
) -> NodeOutcome:
    with node_errors():
        outcome = mc.charge_and_finish(app_db.session, main_api.client(), task, call)
    if not outcome.extra["charged"]:  # reference §3.5: log a refused charge, do not fail the execution
        context.log.warning(f"Billing refused the charge {outcome.extra['idempotency_key']}")
    return outcome
