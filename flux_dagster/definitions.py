from dagster import Definitions

from flux_dagster.jobs.deliver_run_outputs import deliver_run_outputs
from flux_dagster.jobs.process_agent import process_agent
from flux_dagster.jobs.process_single_node import process_single_node
from flux_dagster.jobs.purge_history import purge_history_job
from flux_dagster.jobs.requeue_failed_executions import requeue_failed_executions
from flux_dagster.resources import build_resources, built_once
from flux_dagster.schedules import purge_history_schedule
from flux_dagster.sensors.pending_executions import pending_executions_sensors
from flux_dagster.sensors.run_outcomes import execution_run_canceled_sensor, execution_run_failure_sensor
from flux_dagster.sensors.status_outbox import status_outbox_sensor

defs = Definitions(
    jobs=[process_single_node, process_agent, requeue_failed_executions, purge_history_job, deliver_run_outputs],
    schedules=[purge_history_schedule],
    sensors=[*pending_executions_sensors, execution_run_failure_sensor, execution_run_canceled_sensor,
             status_outbox_sensor],
    resources=built_once(build_resources()),
)
