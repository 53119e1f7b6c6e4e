"""``requeue_failed_executions``: one partition per day; a backfill over a date range queues
again every execution that failed in it, e.g.

    dagster job backfill -w workspace.yaml -j requeue_failed_executions --noprompt \
        --from 2026-11-01 --to 2026-11-07
"""

from dagster import DailyPartitionsDefinition, OpExecutionContext, in_process_executor, job, op

from flux_dagster.backfill import requeue_failed
from flux_dagster.resources import AppDatabase

daily = DailyPartitionsDefinition(start_date="2026-01-01")


@op
def requeue_failed_executions_op(context: OpExecutionContext, app_db: AppDatabase) -> list[int]:
    window = context.partition_time_window
    with app_db.session() as session:
        ids = requeue_failed(session, window.start, window.end)
    context.log.info(f"{len(ids)} failed execution(s) of {context.partition_key} queued again: {ids}")
    context.add_output_metadata({"requeued": len(ids)})
    return ids


@job(partitions_def=daily, executor_def=in_process_executor)
def requeue_failed_executions():
    requeue_failed_executions_op()
