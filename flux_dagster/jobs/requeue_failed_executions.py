"""``requeue_failed_executions``: one partition per day; a backfill over a date range queues
again every execution that failed in it, e.g. (README, "Re-running failed executions")

    DAGSTER_HOME=.flux/dagster .venv/bin/dagster job backfill -w workspace.yaml \
        -j requeue_failed_executions --noprompt --from 2026-11-01 --to 2026-11-07
"""

from dagster import DailyPartitionsDefinition, OpExecutionContext, in_process_executor, job, op

from flux_dagster.backfill import requeue_failed
from flux_dagster.resources import AppDatabase

# end_offset=1: today's partition exists already, so a backfill can cover today's failures.
daily = DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)


@op
def requeue_failed_executions_op(context: OpExecutionContext, app_db: AppDatabase) -> list[int]:
    window = context.partition_time_window
    with app_db.session() as session:
        ids = requeue_failed(session, window.start, window.end)
    context.log.info(f"{len(ids)} failed execution(s) of {context.partition_key} queued again: {ids}")
    context.add_output_metadata({"requeued": len(ids)})
    return ids


@job(partitions_def=daily, executor_def=in_process_executor,
     description="Queues again (a new pending_executions row each) the executions whose latest row "
                 "failed on the partition's day. Run as a backfill over a date range.")
def requeue_failed_executions():
    requeue_failed_executions_op()
