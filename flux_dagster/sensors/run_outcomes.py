"""Rows whose run ended without the run saying so itself: a run worker that died (run monitoring
fails the run) or a run terminated from the UI. Both finish the row once, like the failure hook.

A run whose worker died is retried by Dagster's run retries (dagster.yaml ``run_retries``, for
failures that are not an op's own): while Dagster will retry it, the row stays with the retry;
only the last attempt's failure fails the row, saying how many times its worker died."""

from dagster import (
    DagsterInstance, DagsterRun, DagsterRunStatus, DefaultSensorStatus, RunFailureSensorContext,
    RunStatusSensorContext, SkipReason, run_failure_sensor, run_status_sensor,
)

from flux_dagster.db.models import PendingExecution
from flux_dagster.errors import SystemError_
from flux_dagster.failures import cancel_execution, fail_execution
from flux_dagster.ops.lifecycle import PENDING_EXECUTION_TAG
from flux_dagster.ops.retries import CANCELLED_MESSAGE
from flux_dagster.resources import AppDatabase, NotifierResource

WILL_RETRY_TAG = "dagster/will_retry"
RETRY_NUMBER_TAG = "dagster/retry_number"


def _lineage(instance: DagsterInstance, run: DagsterRun, limit: int = 50) -> set[str]:
    """The run and the runs it re-executes (its parent, their parent, …)."""
    ids, parent = {run.run_id}, run.parent_run_id
    while parent and parent not in ids and len(ids) < limit:
        ids.add(parent)
        parent_run = instance.get_run_by_id(parent)
        parent = parent_run.parent_run_id if parent_run else None
    return ids


def _owned_pending_id(context: RunStatusSensorContext, app_db: AppDatabase) -> int | SkipReason:
    """The row this run executes, unless a newer run (a re-execution) already owns it: a late
    reaction to an old run must not overwrite what the newer run wrote. A retry of a run whose
    worker died owns the row its ancestor took."""
    pending_id = context.dagster_run.tags.get(PENDING_EXECUTION_TAG)
    if pending_id is None:
        return SkipReason("Not an execution run.")
    with app_db.session() as session:
        row = session.get(PendingExecution, int(pending_id))
        owner = row.dagster_run_id if row is not None else None
    if owner is not None and owner not in _lineage(context.instance, context.dagster_run):
        return SkipReason("A newer run owns this execution.")
    return int(pending_id)


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
def execution_run_failure_sensor(context: RunFailureSensorContext, app_db: AppDatabase, notifier: NotifierResource):
    # Fresh tags: Dagster adds the will-retry tag just after storing the failure.
    run = context.instance.get_run_by_id(context.dagster_run.run_id) or context.dagster_run
    if run.tags.get(WILL_RETRY_TAG) == "true":
        return SkipReason("Dagster retries this run: its execution goes on in the retry.")
    pending_id = _owned_pending_id(context, app_db)
    if isinstance(pending_id, SkipReason):
        return pending_id
    message = context.failure_event.message or "The run failed."
    attempts = int(run.tags.get(RETRY_NUMBER_TAG, "0")) + 1
    user_message = ("The execution stopped unexpectedly; it can be re-executed." if attempts == 1 else
                    f"The execution's run stopped unexpectedly on all {attempts} attempts (its worker died or "
                    "could not start); it was not retried again and can be re-executed.")
    error = SystemError_(user_message, dev_message=message)
    if fail_execution(app_db.url, notifier.client(), pending_id, run.run_id, error, message):
        context.log.info(f"pending execution {pending_id} failed by the run-failure sensor")
    return None


@run_status_sensor(run_status=DagsterRunStatus.CANCELED, default_status=DefaultSensorStatus.RUNNING,
                   minimum_interval_seconds=5)
def execution_run_canceled_sensor(context: RunStatusSensorContext, app_db: AppDatabase, notifier: NotifierResource):
    pending_id = _owned_pending_id(context, app_db)
    if isinstance(pending_id, SkipReason):
        return pending_id
    cancel_execution(app_db.url, notifier.client(), pending_id, context.dagster_run.run_id, CANCELLED_MESSAGE)
    return None
