"""Rows whose run ended without the run saying so itself: a run worker that died (run monitoring
fails the run) or a run terminated from the UI. Both finish the row once, like the failure hook."""

from dagster import (
    DagsterRunStatus, DefaultSensorStatus, RunFailureSensorContext, RunStatusSensorContext, SkipReason,
    run_failure_sensor, run_status_sensor,
)

from flux_dagster.db.models import PendingExecution
from flux_dagster.errors import SystemError_
from flux_dagster.failures import cancel_execution, fail_execution
from flux_dagster.ops.lifecycle import PENDING_EXECUTION_TAG
from flux_dagster.ops.retries import CANCELLED_MESSAGE
from flux_dagster.resources import AppDatabase, NotifierResource


def _owned_pending_id(context: RunStatusSensorContext, app_db: AppDatabase) -> int | SkipReason:
    """The row this run executes, unless a newer run (a re-execution) already owns it: a late
    reaction to an old run must not overwrite what the newer run wrote."""
    pending_id = context.dagster_run.tags.get(PENDING_EXECUTION_TAG)
    if pending_id is None:
        return SkipReason("Not an execution run.")
    with app_db.session() as session:
        row = session.get(PendingExecution, int(pending_id))
        if row is not None and row.dagster_run_id not in (None, context.dagster_run.run_id):
            return SkipReason("A newer run owns this execution.")
    return int(pending_id)


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
def execution_run_failure_sensor(context: RunFailureSensorContext, app_db: AppDatabase, notifier: NotifierResource):
    pending_id = _owned_pending_id(context, app_db)
    if isinstance(pending_id, SkipReason):
        return pending_id
    message = context.failure_event.message or "The run failed."
    error = SystemError_("The execution stopped unexpectedly; it can be re-executed.", dev_message=message)
    if fail_execution(app_db.url, notifier.client(), pending_id, context.dagster_run.run_id, error, message):
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
