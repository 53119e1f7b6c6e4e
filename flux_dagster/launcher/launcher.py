"""``WarmRunLauncher``: runs executed by warm run hosts forked from a pre-imported zygote.

With Dagster's ``DefaultRunLauncher`` every run pays a fresh interpreter: ``import dagster``,
the storage classes and the code location, about a second of CPU before the first op, and holds a
process (~35 MB of its own, its storage connections) while it waits for an LLM. Here the launcher
(in the daemon, where the run queue launches runs) keeps one zygote process per version of each
code location (``flux_dagster/launcher/zygote.py``), which forks run hosts
(``flux_dagster/launcher/run_host.py``): warm processes executing many runs at once, one thread
each. A launch is a line on the zygote's stdin. Every run still goes through Dagster's own
run-worker code path, with the same events, results and run storage as with ``DefaultRunLauncher``.

- Code reloads: the zygote is keyed by the code server's id, which changes when the location is
  reloaded or restarted; the next launch starts a new zygote on the new code and the old one exits
  once its runs are done.
- Run monitoring: ``check_run_worker_health`` reports a run host that died (exit status from the
  zygote, else the pid and start time recorded in the run's tags, checked in ``/proc``, else the
  host's heartbeat).
- Termination: ``terminate`` marks the run CANCELING; the host executing it (wherever it is) sees
  that within ``cancel_poll_interval_seconds`` and stops the run's work (``run_host.py``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import Array, Field, StringSource
from dagster import _check as check
from dagster._core.errors import DagsterError, DagsterLaunchFailedError
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from flux_dagster.launcher.run_host import run_worker_health
from flux_dagster.launcher.worker_process import HOST_TAG, PID_TAG

logger = logging.getLogger(__name__)

_UNAVAILABLE = object()  # zygote key part while the code location cannot be reached

# Exit statuses kept per zygote for health checks; older runs fall back to the /proc check.
KEEP_EXITS = 10_000


class _Zygote:
    """The launcher's handle on one zygote process."""

    def __init__(self, setup: dict[str, Any], cwd: str | None, ready_timeout_s: float, on_exit=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux_dagster.launcher.zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd or None, text=True, bufsize=1,
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self._replies: dict[str, dict[str, Any]] = {}
        self._reply_arrived = threading.Condition(self._lock)
        self.exits: dict[str, int] = {}
        self._ready: dict[str, Any] | None = None
        self._on_exit = on_exit
        self.instance_ref: str | None = None
        self._reader = threading.Thread(target=self._read, name="warm-launcher-zygote", daemon=True)
        self._reader.start()
        self._send(setup)
        with self._lock:
            if not self._reply_arrived.wait_for(lambda: self._ready is not None, ready_timeout_s):
                # Given up: killed, so that it does not go on loading beside the next attempt's
                # zygote (under CPU starvation several piled up, each slowing the next).
                self.close()
                self.process.kill()
                raise DagsterLaunchFailedError(
                    f"The run zygote did not load the code in {ready_timeout_s:.0f}s "
                    f"(FLUX_ZYGOTE_START_TIMEOUT_S raises it).")
        if "error" in self._ready:
            raise DagsterLaunchFailedError(f"The run zygote could not load the code location:\n{self._ready['error']}")

    def _send(self, message: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._lock:
                if "ready" in message or "error" in message:
                    self._ready = message
                elif "started" in message:
                    self._replies[message["started"]] = message
                elif "exited" in message:
                    self.exits[message["exited"]] = message["returncode"]
                    if len(self.exits) > KEEP_EXITS:  # the oldest first: monitoring is long done with them
                        del self.exits[next(iter(self.exits))]
                self._reply_arrived.notify_all()
            if "exited" in message and self._on_exit is not None:
                self._on_exit(message["exited"])
        with self._lock:
            self._ready = self._ready or {"error": "the zygote exited"}
            self._reply_arrived.notify_all()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def launch(self, run_id: str, job_name: str, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            self._send({"launch": run_id, "job": job_name})
            if not self._reply_arrived.wait_for(lambda: run_id in self._replies or not self.alive, timeout_s):
                raise DagsterLaunchFailedError(f"The run zygote did not start run {run_id} in {timeout_s:.0f}s.")
            if run_id not in self._replies:
                raise DagsterLaunchFailedError("The run zygote exited before starting the run.")
            return self._replies.pop(run_id)

    def close(self) -> None:
        """Stop launching; the zygote exits once its run workers are done."""
        try:
            self.process.stdin.close()
        except OSError:
            pass


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches runs on run hosts forked from a warm zygote on the launcher's host (module doc)."""

    # One set of zygotes per process: the daemon may build more than one launcher object (its
    # threads load the instance's launcher lazily), and each would otherwise start its own.
    _lock = threading.Lock()
    _zygotes: dict[tuple, _Zygote] = {}
    _retired: list[_Zygote] = []

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        preload_modules: Sequence[str] | None = None,
        start_timeout_seconds: float = 120,
        cancel_poll_interval_seconds: float = 1.0,
        pool_connections: bool = True,
        runs_per_host: int = 100,
        host_processes: int = 0,
        max_runs_per_host: int = 1000,
    ):
        self._inst_data = inst_data
        self.preload_modules = list(preload_modules or [])
        self.pool_connections = pool_connections
        # An operator raises it without rebuilding the image that holds dagster.yaml.
        self.start_timeout_seconds = float(os.environ.get("FLUX_ZYGOTE_START_TIMEOUT_S") or start_timeout_seconds)
        self.cancel_poll_interval_seconds = cancel_poll_interval_seconds
        self.runs_per_host = runs_per_host
        self.host_processes = host_processes or os.cpu_count() or 1
        self.max_runs_per_host = max_runs_per_host
        self._hostname = socket.gethostname()
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {
            "preload_modules": Field(
                Array(StringSource), is_required=False, default_value=[],
                description="Modules the zygote imports up front (e.g. LLM SDKs), shared by every run worker.",
            ),
            "start_timeout_seconds": Field(
                float, is_required=False, default_value=120.0,
                description="How long a new zygote may take to import and load the code location.",
            ),
            "pool_connections": Field(
                bool, is_required=False, default_value=True,
                description="Run workers keep their storage connections in a small pool for the run "
                "(Postgres), instead of one new connection per event.",
            ),
            "cancel_poll_interval_seconds": Field(
                float, is_required=False, default_value=1.0,
                description="How often a run host looks for its runs marked CANCELING (and beats).",
            ),
            "runs_per_host": Field(
                int, is_required=False, default_value=100,
                description="Runs one run host executes at once (one thread each).",
            ),
            "host_processes": Field(
                int, is_required=False, default_value=0,
                description="Run hosts that share the runs (0: one per CPU); more are forked when all are full.",
            ),
            "max_runs_per_host": Field(
                int, is_required=False, default_value=1000,
                description="After this many runs a host takes no more and exits when they are done.",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    # --- launching ------------------------------------------------------------------------------

    def _zygote_for(self, run: DagsterRun, context: LaunchRunContext) -> _Zygote:
        origin = check.not_none(run.job_code_origin, "WarmRunLauncher needs runs with a code origin").repository_origin
        remote_origin = check.not_none(run.remote_job_origin)
        location_name = remote_origin.repository_origin.code_location_origin.location_name
        server_id = None
        if context.workspace is not None:
            try:
                location = context.workspace.get_code_location(location_name)
                server_id = getattr(location, "server_id", None)
            except DagsterError:
                # The code server is away (restarting, or down for a while). Runs do not need it:
                # the zygote loads the code itself. Keep forking from the zygote already loaded,
                # else start one; a reload is picked up once the server answers again.
                logger.warning("WarmRunLauncher: code location %s unavailable; launching from the loaded code",
                               location_name)
                server_id = _UNAVAILABLE
        instance_ref = self._instance_ref()
        key = (instance_ref, location_name, server_id, serialize_value(origin))
        with self._lock:
            WarmRunLauncher._retired = [z for z in self._retired if z.alive]
            if server_id is _UNAVAILABLE:
                key = next((k for k, z in self._zygotes.items() if k[:2] == key[:2] and z.alive), key)
            zygote = self._zygotes.get(key)
            if zygote is not None and zygote.alive:
                return zygote
            for old_key in [k for k in self._zygotes if k[:2] == key[:2]]:
                old = self._zygotes.pop(old_key)
                old.close()
                self._retired.append(old)
            setup = {
                "instance_ref": instance_ref,
                "repository_origin": serialize_value(origin),
                "preload_modules": self.preload_modules,
                "pool_connections": self.pool_connections,
                "runs_per_host": self.runs_per_host,
                "host_processes": self.host_processes,
                "max_runs_per_host": self.max_runs_per_host,
                "cancel_poll_interval_seconds": self.cancel_poll_interval_seconds,
            }
            zygote = _Zygote(setup, getattr(origin.code_pointer, "working_directory", None), self.start_timeout_seconds,
                             on_exit=self._settle_exited)
            zygote.instance_ref = instance_ref
            self._zygotes[key] = zygote
            return zygote

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        # The host tags the run with its pid and machine itself, before the run starts.
        self._zygote_for(run, context).launch(run.run_id, run.job_name, timeout_s=30)

    # --- monitoring and termination ---------------------------------------------------------------

    def _instance_ref(self) -> str:
        if getattr(self, "_serialized_ref", None) is None:
            self._serialized_ref = serialize_value(self._instance.get_ref())
        return self._serialized_ref

    def _owned(self) -> list[_Zygote]:
        """The zygotes of this launcher's instance (a test process holds several instances)."""
        ref = self._instance_ref()
        with self._lock:
            return [z for z in (*self._zygotes.values(), *self._retired) if z.instance_ref == ref]

    def _exit_code(self, run_id: str) -> int | None:
        for zygote in self._owned():
            if run_id in zygote.exits:
                return zygote.exits[run_id]
        return None

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return run_worker_health(self._instance, run, self._exit_code(run.run_id), self._hostname)

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        exit_code = self._exit_code(run.run_id)
        return (
            f"run worker pid {run.tags.get(PID_TAG)} on {run.tags.get(HOST_TAG)}"
            + (f", exit status {exit_code}" if exit_code is not None else "")
        )

    def _settle_exited(self, run_id: str) -> None:
        """A run worker exited while its run was CANCELING: the cancel came too late when the run
        had already succeeded (its success is restored, so no CANCELING is left behind), else the
        run is CANCELED now rather than when run monitoring times the cancel out."""
        try:
            run = self._instance.get_run_by_id(run_id)
            if run is None or run.status != DagsterRunStatus.CANCELING:
                return
            from dagster._core.events import DagsterEvent, DagsterEventType

            ended = {e.dagster_event.event_type for e in self._instance.all_logs(
                run_id, of_type={DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE})}
            if DagsterEventType.RUN_SUCCESS in ended:
                self._instance.report_dagster_event(
                    DagsterEvent(event_type_value=DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name,
                                 message="The run had succeeded when the termination request arrived."),
                    run_id=run_id,
                )
            else:
                self._instance.report_run_canceled(run, message="The run worker exited after the termination request.")
        except Exception:  # noqa: BLE001 - run monitoring still settles it after its cancel timeout
            logger.exception("WarmRunLauncher: could not settle run %s after its worker exited", run_id)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        if self._exit_code(run_id) is not None:
            return False  # its host is done with it: the run is settled (or being settled) by its own events
        # The host executing the run (here or on another machine) stops it once it sees this.
        self._instance.report_run_canceling(run)
        return True

    def dispose(self) -> None:
        for zygote in self._owned():
            zygote.close()
