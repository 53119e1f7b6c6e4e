"""``flux-dagster run-worker``: a Celery worker executing the runs ``CeleryRunLauncher`` sends.

One worker process is one run host (``run_host.py``): one ``DagsterInstance`` (``DAGSTER_HOME``'s
dagster.yaml, so the daemon's storage), the code location imported once, and Celery's ``threads``
pool running each task (one run) on a thread of its own, up to ``--concurrency`` at once. Start as
many workers, on as many machines, as the load needs: they share the broker's queue.

A task can arrive twice: the broker hands the task of a worker that died (or lost its broker
connection) to another. The second delivery executes the run only if it never started and no live
host has taken it (``not_to_execute``; a run a host tagged and that host still looks alive is
looked at again after ``HEARTBEAT_STALE_S``). Dagster's own ``core_execute_run`` would refuse a run
past STARTING too, but the run host tags the run with its pid before that, which would hide the
dead host from run monitoring. A run the dead worker had started is failed by run monitoring and
re-executed by Dagster's run retries.

Runs whose executor starts step processes of its own (``process_agent``'s multiprocess executor)
stop only on the main thread's interrupt: each of them runs in a child process of its own
(``python -m flux_dagster.launcher.celery_worker RUN_ID``, a run host executing that one run on
its main thread), so terminating it stops its step processes as under ``dagster api execute_run``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from flux_dagster.launcher.celery_launcher import TASK_NAME, CeleryRunLauncher, celery_app
from flux_dagster.launcher.run_host import HEARTBEAT_STALE_S, RunHost, needs_main_thread, run_worker_health
from flux_dagster.launcher.worker_process import PID_TAG

logger = logging.getLogger(__name__)

_host: RunHost | None = None  # this worker process's run host, built before the first task


def _held_by_live_host(instance, run: DagsterRun) -> bool:
    """A run host has tagged the run and is not known to be dead (its process on this machine,
    else its heartbeat; a host that has not beaten yet counts as alive)."""
    if not run.tags.get(PID_TAG):
        return False
    return run_worker_health(instance, run, None, socket.gethostname()).status != WorkerStatus.FAILED


def not_to_execute(instance, run: DagsterRun | None) -> str | None:
    """Why this delivery of a run's task must not execute it, or None. A run cancelled before any
    host took it is settled CANCELED here (no host watches it)."""
    if run is None:
        return "the run does not exist (deleted?)"
    if run.status == DagsterRunStatus.CANCELING and not _held_by_live_host(instance, run):
        instance.report_run_canceled(run, message="Terminated while no live run worker had it.")
        return "it was terminated while no live run worker had it"
    if run.status not in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING):
        return f"it is already {run.status.value} (run monitoring and run retries handle a host that died)"
    return None


_own_process: dict[str, bool] = {}  # a job's code origin -> needs_main_thread


def _needs_own_process(run: DagsterRun) -> bool:
    from dagster._serdes import serialize_value
    from dagster._utils.hosted_user_process import recon_job_from_origin

    key = serialize_value(run.job_code_origin)
    if key not in _own_process:
        try:
            _own_process[key] = needs_main_thread(recon_job_from_origin(run.job_code_origin).get_definition())
        except Exception:  # noqa: BLE001 - cannot load it here: the run's own execution reports why
            return False
    return _own_process[key]


def _execute_in_own_process(run_id: str) -> int:
    # Its own session: a signal for this worker's process group does not reach the run, and a
    # worker killed outright leaves it to finish (its task's second delivery sees it live).
    child = subprocess.Popen([sys.executable, "-m", __name__, run_id], start_new_session=True)
    return child.wait()


def execute_run_task(task, run_id: str) -> str:
    """The Celery task: execute one run on this thread (or its own process), once."""
    from dagster._core.events import EngineEventData

    instance = _host.instance
    run = instance.get_run_by_id(run_id)
    reason = not_to_execute(instance, run)
    if reason is None and _held_by_live_host(instance, run):
        # Another host tagged the run and has not started it yet, or died before it could and
        # still looks alive: on another machine its heartbeat goes stale only after a while.
        # Look again then; by that time the run has started there, or that host is known dead.
        raise task.retry(countdown=HEARTBEAT_STALE_S, max_retries=None)
    if reason is not None:
        if run is not None:
            instance.report_engine_event(f"A run worker got this run's task again; not executing it: {reason}.",
                                         run, EngineEventData())
        logger.info("run %s not executed: %s", run_id, reason)
        return f"skipped: {reason}"
    code = _execute_in_own_process(run_id) if _needs_own_process(run) else _host.execute(run_id)
    return f"executed, exit {code}"


def _celery_launcher(instance) -> CeleryRunLauncher:
    launcher = instance.run_launcher
    if not isinstance(launcher, CeleryRunLauncher):
        raise SystemExit(
            f"run-worker: the instance in DAGSTER_HOME={os.environ.get('DAGSTER_HOME')} launches runs with "
            f"{type(launcher).__name__}; its dagster.yaml must configure CeleryRunLauncher (docs/multi-host.md)."
        )
    return launcher


def run_worker(concurrency: int, loglevel: str = "INFO") -> int:
    """Serve the launcher's queue until a shutdown (SIGTERM or SIGINT: Celery's warm shutdown
    waits for the runs in flight)."""
    global _host
    import importlib

    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    launcher = _celery_launcher(instance)
    for module in launcher.preload_modules:  # once, before any run: no run pays the imports
        importlib.import_module(module)
    # Built once: Dagster's per-run dictConfig would deadlock runs sharing a process
    # (flux_dagster/instance.py).
    instance.get_handlers()
    _host = RunHost(instance, poll_interval_s=launcher.cancel_poll_interval_seconds)
    app = celery_app(launcher.broker_url, launcher.queue, launcher.broker_transport_options)
    app.task(name=TASK_NAME, bind=True)(execute_run_task)
    try:
        app.worker_main([
            "worker", "--pool=threads", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
            f"--hostname=flux-{os.getpid()}@%h",
            # Nothing but the run queue on the broker: no worker-to-worker chatter.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ])
    finally:
        _host.close()
    return 0


def execute_alone(run_id: str) -> int:
    """One run on this process's main thread: a termination is Dagster's own interrupt."""
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    host = RunHost(instance, poll_interval_s=_celery_launcher(instance).cancel_poll_interval_seconds)
    try:
        return host.execute(run_id)
    finally:
        host.close()


if __name__ == "__main__":
    raise SystemExit(execute_alone(sys.argv[1]))
