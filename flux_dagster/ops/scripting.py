"""The scripting branch (reference §4.2): one op, the node's script in the configured runner."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.scripting import run_scripting
from flux_dagster.ops.guards import earlier_completion, reused_outcome
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase
from flux_dagster.scripting.resource import ScriptRunnerResource


@op(retry_policy=RETRY_POLICIES["scripting"])
def scripting(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, script_runner: ScriptRunnerResource
) -> NodeOutcome:
    """``scriptingActivity``: a failing script is a user error and ends the step at once; only the
    runner's transient failures (Lambda throttling, 5xx, timeouts) reach the RetryPolicy."""
    if (earlier := earlier_completion(context, app_db, task)) is not None:
        return reused_outcome(task, earlier)
    with node_errors():
        outcome = run_scripting(app_db.url, script_runner.runner(), task)
    context.add_output_metadata({"language": outcome.extra["language"], "runner": outcome.extra["runner"]})
    return outcome
