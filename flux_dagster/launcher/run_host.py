"""A run host: one warm process that executes many runs at once, each on a thread of its own.

An execution spends most of its time waiting (for an LLM, the main API, a script), so a process
per run mostly holds memory and connections while it waits. A run host shares one interpreter, one
set of pooled storage connections and one SDK client per provider between all its runs. Every run
still goes through Dagster's own run-execution path (``core_execute_run``, what ``dagster api
execute_run`` does) with its whole event log; only the process is shared.

- Termination is cooperative: the host watches its runs for CANCELING (whoever asked: the UI, the
  sensor for a cancelled row, a shutdown) and stops that run's thread inside its current or next
  node body (``flux_dagster.interrupts``); the step ends interrupted and the run CANCELED.
- Liveness: the host writes a heartbeat to Dagster's key-value storage every poll, keyed by the
  host, pid and process start recorded in each of its runs' tags, so a launcher on another machine
  can tell a dead host from a live one (``run_worker_health``).
- Compute logs: threads share the process's stdout, so runs cannot have a captured stdout each;
  dagster.yaml sets the ``NoOpComputeLogManager`` (the event log holds what the nodes report).

Run hosts are started by the warm launcher's zygote (``zygote.py``) and by the Celery worker
(``celery_worker.py``); both call ``RunHost.execute`` on a thread per run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus, RunsFilter

from flux_dagster import interrupts
from flux_dagster.instance_storage import POOL_MAX_OVERFLOW
from flux_dagster.launcher.worker_process import HOST_TAG, PID_TAG, START_TAG, process_start_ticks, worker_tags

logger = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "flux/run_host/"
# A host whose heartbeat is older than this is taken for dead by a launcher on another machine.
HEARTBEAT_STALE_S = 30.0


def heartbeat_key(host: str, pid: int | str, start_ticks: int | str) -> str:
    return f"{HEARTBEAT_PREFIX}{host}:{pid}:{start_ticks}"


def needs_main_thread(job_def) -> bool:
    """A job whose executor starts step processes of its own (``process_agent``'s multiprocess
    executor) stops them only on the main thread's interrupt: its run needs a process of its own."""
    return job_def.executor_def.name != "in_process"


def execute_run(instance, run_id: str) -> int:
    """What ``dagster api execute_run`` does for one run, on the calling thread. 0 when the run
    ended without an error in the run worker itself (its outcome is in the event log)."""
    from dagster._core.events import EngineEventData
    from dagster._grpc.impl import core_execute_run
    from dagster._utils.hosted_user_process import recon_job_from_origin

    run = instance.get_run_by_id(run_id)
    if run is None or run.job_code_origin is None:
        print(f"run host: run {run_id} not found or without a code origin", file=sys.stderr)
        return 1
    pid = os.getpid()
    # Before the run can be STARTED, so that run monitoring always finds its host.
    instance.add_run_tags(run_id, worker_tags(pid))
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    failed = False
    try:
        for _ in core_execute_run(recon_job_from_origin(run.job_code_origin), run, instance, inject_env_vars=True):
            pass
    except BaseException:  # noqa: BLE001 - core_execute_run has written the failure to the event log
        failed = True
    finally:
        instance.report_engine_event(f"Process for run exited (pid: {pid}).", run)
    return 1 if failed else 0


class RunHost:
    """Executes runs on the callers' threads; watches them for termination; beats."""

    def __init__(self, instance, pool_connections: bool = True, poll_interval_s: float = 1.0):
        if pool_connections:
            # Fresh pooled engines of the host's own (the storage's pooled mode, as every process
            # gets from instance_storage.py), never connections inherited across the fork. A no-op
            # on SQLite.
            instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=POOL_MAX_OVERFLOW)
        self.instance = instance
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._runs: dict[str, int] = {}  # run id -> the ident of the thread executing it
        self._stopped: set[str] = set()
        self._closed = threading.Event()
        pid = os.getpid()
        self.heartbeat_key = heartbeat_key(worker_tags(pid)[HOST_TAG], pid, process_start_ticks(pid) or "")
        self._watcher = threading.Thread(target=self._watch, name="run-host-watch", daemon=True)
        self._watcher.start()

    @property
    def runs(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def execute(self, run_id: str) -> int:
        from dagster._utils.interrupts import capture_interrupts

        ident = threading.get_ident()
        with self._lock:
            self._runs[run_id] = ident
        try:
            with capture_interrupts():  # on the main thread only: SIGTERM then interrupts the run
                return execute_run(self.instance, run_id)
        finally:
            with self._lock:
                self._runs.pop(run_id, None)
                self._stopped.discard(run_id)
            interrupts.forget_thread(ident)

    def stop(self, run_id: str, reason: str = "The run was terminated.") -> None:
        """Stop one run's work: its step ends interrupted, and the run CANCELED (it is CANCELING)."""
        from dagster._core.errors import DagsterExecutionInterruptedError

        with self._lock:
            ident = self._runs.get(run_id)
            if ident is None or run_id in self._stopped:
                return
            self._stopped.add(run_id)
        if ident == threading.main_thread().ident:
            os.kill(os.getpid(), signal.SIGTERM)  # Dagster's own interrupt path (see execute)
        else:
            interrupts.stop_thread(ident, DagsterExecutionInterruptedError(reason))

    def stop_all(self, reason: str) -> None:
        for run_id in self.runs:
            self.stop(run_id, reason)

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            try:
                self.instance.run_storage.set_cursor_values({self.heartbeat_key: str(time.time())})
                live = self.runs
                if live:
                    for run_id in self.instance.get_run_ids(
                        RunsFilter(run_ids=live, statuses=[DagsterRunStatus.CANCELING])
                    ):
                        self.stop(run_id)
            except Exception:  # noqa: BLE001 - storage hiccup: try again next poll
                logger.exception("run host: could not beat or look for canceling runs")

    def close(self) -> None:
        self._closed.set()
        self._watcher.join(timeout=5)
        try:
            # A host that exits cleanly is not taken for a dead one later.
            self.instance.run_storage.set_cursor_values({self.heartbeat_key: "0"})
        except Exception:  # noqa: BLE001
            pass
        self.instance.dispose()


def run_worker_health(instance, run: DagsterRun, exit_code: int | None, this_host: str) -> CheckRunHealthResult:
    """Run monitoring's view of the host executing ``run``: its exit status when this launcher's
    zygote reaped it, ``/proc`` on this machine, else the host's heartbeat."""
    tags = run.tags
    pid_tag = tags.get(PID_TAG)
    if not pid_tag:
        # Our hosts tag the run before it starts: this one was launched otherwise (e.g. before
        # this launcher was configured). Nothing to judge it by; max runtime still applies.
        return CheckRunHealthResult(WorkerStatus.RUNNING, "Not started by a flux-dagster run host.")
    if exit_code is not None:
        how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
        return CheckRunHealthResult(WorkerStatus.FAILED, f"Run host {pid_tag} {how} before the run finished.")
    if tags.get(HOST_TAG) == this_host:
        ticks = process_start_ticks(int(pid_tag))
        if ticks is None or (tags.get(START_TAG) and str(ticks) != tags[START_TAG]):
            return CheckRunHealthResult(WorkerStatus.FAILED, f"Run host process {pid_tag} is gone.")
        return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=pid_tag)
    key = heartbeat_key(tags.get(HOST_TAG), pid_tag, tags.get(START_TAG, ""))
    beat = instance.run_storage.get_cursor_values({key}).get(key)
    if beat is None:
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"No heartbeat yet from run host {pid_tag} on {tags.get(HOST_TAG)}.")
    age = time.time() - float(beat)
    if age > HEARTBEAT_STALE_S:
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"Run host {pid_tag} on {tags.get(HOST_TAG)} last beat {age:.0f} s ago."
        )
    return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=f"{tags.get(HOST_TAG)}:{pid_tag}")
