"""The SQL querier branch (reference §4.7)."""

from dagster import op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.sql_querier import run_sql_querier
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


@op(retry_policy=RETRY_POLICIES["sql_querier"])
def sql_querier(task: NodeTask, app_db: AppDatabase) -> NodeOutcome:
    with node_errors():
        return run_sql_querier(app_db.session, task)
