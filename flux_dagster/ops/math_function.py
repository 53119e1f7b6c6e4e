"""The math function branch (reference §4.4)."""

from dagster import op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.math_function import run_math_function
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


@op(retry_policy=RETRY_POLICIES["math_function"])
def math_function(task: NodeTask, app_db: AppDatabase) -> NodeOutcome:
    with node_errors():
        return run_math_function(app_db.session, task)
