"""``PromptRunCoordinator``: Dagster's run queue, without the wait for its next tick when there is room.

With ``QueuedRunCoordinator`` a run submitted by the sensor waits for the queue daemon's next
dequeue (every ``dequeue_interval_seconds``, at least 1 s): half a second on average, most of an
execution's latency at low load. Here a submitted run is launched at once, as Dagster's
``DefaultRunCoordinator`` does, when nothing waits in the queue and the deployment is under
``max_concurrent_runs`` and every ``tag_concurrency_limits`` that applies to it; otherwise it is
queued exactly as ``QueuedRunCoordinator`` queues it, and the daemon dequeues it in order.

Only runs a sensor requested go this way, and not re-executions: those are submitted by the
daemon (the sensor loop), so the run still starts on the daemon's run hosts. A run submitted from
the webserver (a re-execution, a launch from the launchpad) is queued and launched by the daemon,
as before. Several
sensor threads submit at once, so a limit may be passed by up to that many runs
(``sensors.num_submit_workers``) for a moment; the queue's own dequeues respect it.
"""

from __future__ import annotations

import logging

from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, SENSOR_NAME_TAG

logger = logging.getLogger(__name__)


class PromptRunCoordinator(QueuedRunCoordinator):
    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        prompt = SENSOR_NAME_TAG in run.tags and PARENT_RUN_ID_TAG not in run.tags
        if prompt and run.status == DagsterRunStatus.NOT_STARTED and context.workspace is not None \
                and self._room_for(run):
            # launch_run records a launch failure on the run (FAILED, with the error), as the
            # queue daemon's launch would; the run-failure sensor and run retries take it from there.
            return self._instance.launch_run(run.run_id, context.workspace)
        return super().submit_run(context)

    def _room_for(self, run: DagsterRun) -> bool:
        instance = self._instance
        if instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED])):
            return False  # first come, first served: the queue goes first
        in_progress = list(IN_PROGRESS_RUN_STATUSES)
        limit = self.get_run_queue_config().max_concurrent_runs
        if limit >= 0 and instance.get_runs_count(RunsFilter(statuses=in_progress)) >= limit:
            return False
        for tag_limit in self.get_run_queue_config().tag_concurrency_limits or []:
            key, value = tag_limit["key"], tag_limit.get("value")
            if key not in run.tags or (isinstance(value, str) and run.tags[key] != value):
                continue
            tags = {key: run.tags[key]}
            if instance.get_runs_count(RunsFilter(statuses=in_progress, tags=tags)) >= tag_limit["limit"]:
                return False
        return True
