"""The API caller branch (reference §4.3)."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.api_caller import run_api_caller
from flux_dagster.ops.guards import earlier_completion, reused_outcome
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


@op(retry_policy=RETRY_POLICIES["api_caller"])
def api_caller(context: OpExecutionContext, task: NodeTask, app_db: AppDatabase) -> NodeOutcome:
    if (earlier := earlier_completion(context, app_db, task)) is not None:
        return reused_outcome(task, earlier)
    with node_errors():
        outcome = run_api_caller(app_db.session, task)
    context.add_output_metadata({"status_code": outcome.extra["statusCode"],
                                 "polling_calls": outcome.extra["pollingCallCount"]})
    return outcome
