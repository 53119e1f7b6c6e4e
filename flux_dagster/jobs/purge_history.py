"""``purge_history``: deletes the runs and this project's rows older than the retention window
(``flux_dagster/purge.py``); scheduled daily by ``purge_history_schedule``."""

from dagster import Config, OpExecutionContext, in_process_executor, job, op

from flux_dagster import settings
from flux_dagster.purge import count_purgeable, cutoff_for, purge_history
from flux_dagster.resources import AppDatabase, NotifierResource

DEFAULT_RETENTION_DAYS = 30


class PurgeConfig(Config):
    older_than_days: float = float(settings.env("FLUX_HISTORY_DAYS") or DEFAULT_RETENTION_DAYS)


@op
def purge_history_op(context: OpExecutionContext, config: PurgeConfig, app_db: AppDatabase,
                     notifier: NotifierResource) -> dict[str, int]:
    cutoff = cutoff_for(config.older_than_days)
    redis_configured = bool(notifier.redis_url)
    with app_db.session() as session:
        planned = count_purgeable(context.instance, session, cutoff, redis_configured)
    context.log.info(f"purging what finished before {cutoff.isoformat()}: {planned}")
    counts = purge_history(context.instance, app_db.session, cutoff, redis_configured)
    deleted = {"runs": counts.runs, "pending_executions": counts.pending_executions,
               "status_notifications": counts.status_notifications}
    context.add_output_metadata(deleted)
    return deleted


@job(name="purge_history", executor_def=in_process_executor,
     description="Deletes finished Dagster runs (events, compute logs, step outputs) and terminal "
                 "pending_executions / published status_notifications older than older_than_days "
                 "(FLUX_HISTORY_DAYS, default 30). Never the token ledger.")
def purge_history_job():
    purge_history_op()
