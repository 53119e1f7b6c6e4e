"""The counter branch (reference §4.5)."""

from dagster import op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.counter import run_counter
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


@op(retry_policy=RETRY_POLICIES["counter"])
def counter(task: NodeTask, app_db: AppDatabase) -> NodeOutcome:
    with node_errors():
        return run_counter(app_db.session, task)
