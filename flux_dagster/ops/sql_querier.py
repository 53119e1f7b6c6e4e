"""The SQL querier branch (reference §4.7)."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.sql_querier import run_sql_querier
from flux_dagster.ops.guards import earlier_completion, reused_outcome
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


@op(retry_policy=RETRY_POLICIES["sql_querier"])
def sql_querier(context: OpExecutionContext, task: NodeTask, app_db: AppDatabase) -> NodeOutcome:
    if (earlier := earlier_completion(context, app_db, task)) is not None:
        return reused_outcome(task, earlier)
    with node_errors():
        return run_sql_querier(app_db.session, task)
