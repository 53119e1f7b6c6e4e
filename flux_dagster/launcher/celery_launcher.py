"""``CeleryRunLauncher``: runs executed by run hosts on other machines, fed through Celery.

``WarmRunLauncher`` forks its run hosts on the daemon's machine; past one machine, the runs go
through a broker the operator already runs (RabbitMQ or Redis) to ``flux-dagster run-worker``
processes on any number of hosts (``celery_worker.py``). A launch is one Celery task carrying the
run id; the worker that takes it executes the run through Dagster's own run-execution path
(``RunHost``), against the same instance storage as the daemon.

- Delivery: tasks are acknowledged when their run has ended (``acks_late``), so the broker hands
  the task of a worker that died to another one. That worker executes the run only if it had not
  started (see ``celery_worker.not_to_execute``); a run that had started is failed by run
  monitoring and re-executed by Dagster's run retries, launched here again.
- Run monitoring: ``check_run_worker_health`` judges the host recorded in the run's tags, by
  ``/proc`` when it is on the daemon's machine, else by its heartbeat in the instance storage.
- Termination: ``terminate`` marks the run CANCELING; the host executing it stops it, and a
  worker that takes the task of a run cancelled before it started settles it as CANCELED.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import Array, Field, Permissive, StringSource
from dagster._core.events import EngineEventData
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from flux_dagster.launcher.run_host import run_worker_health
from flux_dagster.launcher.worker_process import HOST_TAG, PID_TAG

logger = logging.getLogger(__name__)

TASK_NAME = "flux_dagster.execute_run"
DEFAULT_QUEUE = "flux-dagster-runs"
DEFAULT_PRELOAD = ["flux_dagster.definitions"]


def celery_app(broker_url: str, queue: str, transport_options: Mapping[str, Any] | None = None):
    """The Celery app both sides use: the launcher sends with it, ``run-worker`` consumes."""
    from celery import Celery

    app = Celery("flux_dagster", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=dict(transport_options or {}),
        # On the broker: this queue and a direct exchange of the same name, nothing else.
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        # A run's outcome is in Dagster's storage: no result backend.
        task_ignore_result=True,
        # Acknowledged once the run has ended: the task of a worker that dies goes to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker holds no more tasks than it has threads: the rest wait for any free worker.
        worker_prefetch_multiplier=1,
        # No remote-control or event queues on the operator's broker; only the run queue.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # Dagster's console log goes to stderr as it is, not re-logged by Celery as warnings.
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
    )
    return app


class CeleryRunLauncher(RunLauncher, ConfigurableClass):
    """Sends each run to a Celery queue served by ``flux-dagster run-worker`` (see module doc)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, broker_url: str = "",
                 queue: str = DEFAULT_QUEUE, preload_modules: Sequence[str] | None = None,
                 cancel_poll_interval_seconds: float = 1.0, broker_transport_options: Mapping[str, Any] | None = None):
        self._inst_data = inst_data
        self.broker_url = broker_url
        self.queue = queue
        self.broker_transport_options = dict(broker_transport_options or {})
        self.preload_modules = list(DEFAULT_PRELOAD if preload_modules is None else preload_modules)
        self.cancel_poll_interval_seconds = cancel_poll_interval_seconds
        self._app = None
        self._app_lock = threading.Lock()
        self._hostname = socket.gethostname()
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {
            "broker_url": Field(
                StringSource, is_required=True,
                description="Celery broker, e.g. amqp://user:password@rabbitmq:5672// or redis://redis:6379/1.",
            ),
            "queue": Field(
                StringSource, is_required=False, default_value=DEFAULT_QUEUE,
                description="The broker queue the runs go to and the workers consume.",
            ),
            "broker_transport_options": Field(
                Permissive(), is_required=False, default_value={},
                description="Celery's broker_transport_options, e.g. {global_keyprefix: 'flux:'} on a shared Redis.",
            ),
            "preload_modules": Field(
                Array(StringSource), is_required=False, default_value=DEFAULT_PRELOAD,
                description="Modules a worker imports before taking runs: the code location, LLM SDKs.",
            ),
            "cancel_poll_interval_seconds": Field(
                float, is_required=False, default_value=1.0,
                description="How often a worker looks for its runs marked CANCELING (and beats).",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    @property
    def app(self):
        """Built on first use: every process that loads the instance builds its launcher, and
        only the daemon (and the UI, for re-executions) sends."""
        with self._app_lock:
            if self._app is None:
                self._app = celery_app(self.broker_url, self.queue, self.broker_transport_options)
            return self._app

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        # The worker tags the run with its pid and machine itself, before the run starts.
        sent = self.app.send_task(TASK_NAME, args=[run.run_id], queue=self.queue)
        self._instance.report_engine_event(
            f"Sent to Celery queue {self.queue} (task {sent.id}).", run, EngineEventData(),
        )

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return run_worker_health(self._instance, run, None, self._hostname)

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        return f"run worker pid {run.tags.get(PID_TAG)} on {run.tags.get(HOST_TAG)} (Celery queue {self.queue})"

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        # The host executing the run stops it once it sees this; a worker that takes the task
        # later settles it CANCELED without executing it.
        self._instance.report_run_canceling(run)
        return True

    def dispose(self) -> None:
        if self._app is not None:
            self._app.close()
