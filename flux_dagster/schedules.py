"""Schedules of the code location."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from flux_dagster.jobs.purge_history import purge_history_job

# Daily, at a quiet hour (UTC); the purge works in small batches, so the queue keeps flowing.
purge_history_schedule = ScheduleDefinition(
    name="purge_history_daily", job=purge_history_job, cron_schedule="17 3 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Bounded history: runs purge_history once a day.",
)
