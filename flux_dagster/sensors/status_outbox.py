"""``status_outbox_sensor``: publishes the statuses kept in ``status_notifications`` while Redis
was unreachable, in the order they happened, once it is back (see services/notifications.py)."""

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from flux_dagster.resources import NotifierResource
from flux_dagster.services.notifications import flush_outbox


@sensor(default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5,
        description="Publishes status notifications kept while Redis was unreachable, in order.")
def status_outbox_sensor(context: SensorEvaluationContext, notifier: NotifierResource):
    if not notifier.redis_url:
        return SkipReason("No Redis configured: statuses are recorded in status_notifications.")
    published = flush_outbox(notifier.database.url, notifier.redis_url, notifier.channel)
    if not published:
        return SkipReason("No kept statuses to publish.")
    context.log.info(f"published {published} kept status notification(s)")
    return SkipReason(f"Published {published} kept status notification(s).")
