"""The warm process behind :class:`~flux_dagster.launcher.WarmRunLauncher`.

Started once per code location version by the launcher (``python -m flux_dagster.launcher.zygote``),
it imports Dagster, the storage classes and the code location, builds the instance, and then forks
one run worker per run: a fork of an idle, single-threaded, fully imported interpreter starts in
milliseconds and shares its memory pages with this process until it writes to them.

Each run worker executes its run exactly as ``dagster api execute_run`` does (the command Dagster's
own container launchers start), then exits. The zygote itself never executes runs.

Protocol, one JSON object per line. In on stdin: first ``{"instance_ref", "repository_origin",
"preload_modules", "pool_connections"}``, then ``{"launch": run_id}``. Out on the original stdout:
``{"ready": true}`` or ``{"error": text}`` once, then ``{"started": run_id, "pid"}``
per launch and ``{"exited": run_id, "pid", "returncode"}`` per run worker reaped (negative: killed
by that signal). End of stdin (the launcher stopped, or its daemon exited): stop launching, let the
run workers finish within ``FLUX_SHUTDOWN_GRACE_S``, terminate the rest and offer their executions
again (``shutdown.py``), exit.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import selectors
import signal
import sys
import threading
import time
import traceback

from flux_dagster.launcher.worker_process import worker_tags

# How often the zygote reaps finished run workers while no command arrives.
REAP_INTERVAL_S = 0.2


def _execute_run(instance, run_id: str, pool_connections: bool) -> int:
    """Body of the run worker: what ``dagster api execute_run`` does for one run."""
    from dagster._core.events import EngineEventData
    from dagster._grpc.impl import core_execute_run
    from dagster._utils.hosted_user_process import recon_job_from_origin
    from dagster._utils.interrupts import capture_interrupts

    if pool_connections:
        # The storage's pooled mode (the one dagster-webserver turns on): a run writes ~100
        # events, and without it dagster-postgres opens a new connection for each. No statement
        # timeout, as in the default mode. A no-op on SQLite.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
    with capture_interrupts():
        run = instance.get_run_by_id(run_id)
        if run is None or run.job_code_origin is None:
            print(f"run worker: run {run_id} not found or without a code origin", file=sys.stderr)
            return 1
        pid = os.getpid()
        # Before the run can be STARTED, so that run monitoring always finds its worker.
        instance.add_run_tags(run_id, worker_tags(pid))
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
        failed = False
        try:
            for _ in core_execute_run(recon_job_from_origin(run.job_code_origin), run, instance, inject_env_vars=True):
                pass
        except BaseException:  # noqa: BLE001 - core_execute_run has written the failure to the event log
            failed = True
        finally:
            instance.report_engine_event(f"Process for run exited (pid: {pid}).", run)
            instance.dispose()  # closes pooled connections before the worker's os._exit
    return 1 if failed else 0


class Zygote:
    def __init__(self, commands, replies):
        self.commands, self.replies = commands, replies
        self.children: dict[int, str] = {}
        self.instance = None
        self.pool_connections = True
        self._pending = b""
        self._warned_threads = False

    def reply(self, **message) -> None:
        if self.replies.closed:
            return
        try:
            self.replies.write(json.dumps(message) + "\n")
            self.replies.flush()
        except BrokenPipeError:  # the launcher's process is gone: nobody left to tell
            self.replies = open(os.devnull, "w")

    def load(self, setup: dict) -> None:
        from dagster import DagsterInstance
        from dagster._serdes import deserialize_value
        from dagster._utils.hosted_user_process import recon_repository_from_origin

        for module in setup.get("preload_modules") or []:
            importlib.import_module(module)
        origin = deserialize_value(setup["repository_origin"])
        recon_repository_from_origin(origin).get_definition()
        self.instance = DagsterInstance.from_ref(deserialize_value(setup["instance_ref"]))
        self.pool_connections = setup.get("pool_connections", True)

    def fork_run_worker(self, run_id: str) -> None:
        if threading.active_count() > 1 and not self._warned_threads:
            self._warned_threads = True
            print("run zygote: a thread is running; forking anyway, but run workers may hang", file=sys.stderr)
        # Without this, the run worker's first full collection walks (and so copies) every object
        # it shares with the zygote: ~100 MB private per worker instead of ~35 MB (bench/).
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()  # its own process group: a signal for the run reaches its subprocesses
                os.close(self.commands)
                self.replies.close()
                code = _execute_run(self.instance, run_id, self.pool_connections)
            except BaseException:  # noqa: BLE001 - report anything, then leave without the zygote's cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = run_id
        self.reply(started=run_id, pid=pid)

    def reap(self, block: bool = False) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            run_id = self.children.pop(pid, None)
            if run_id is not None:
                self.reply(exited=run_id, pid=pid, returncode=os.waitstatus_to_exitcode(status))

    def read_lines(self) -> list[str] | None:
        """The complete lines available on stdin, None at its end. Reads the fd directly: a
        buffered reader would keep lines that arrived together where select() cannot see them."""
        chunk = os.read(self.commands, 65536)
        if not chunk:
            return None
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        return [line.decode() for line in lines if line]

    def serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.commands, selectors.EVENT_READ)
        while True:
            if selector.select(REAP_INTERVAL_S):
                lines = self.read_lines()
                if lines is None:
                    break
                for line in lines:
                    self.fork_run_worker(json.loads(line)["launch"])
            self.reap()
        self.drain()

    def drain(self) -> None:
        """Shutdown: wait for the runs in flight, up to the grace period; then terminate them and
        offer their executions again, so none is left ``running``."""
        from flux_dagster.launcher.shutdown import TERMINATE_WAIT_S, offer_again, report_canceling, shutdown_grace_s

        deadline = time.monotonic() + shutdown_grace_s()
        while self.children and time.monotonic() < deadline:
            time.sleep(REAP_INTERVAL_S)
            self.reap()
        if not self.children:
            return
        interrupted = dict(self.children)
        report_canceling(self.instance, list(interrupted.values()))  # as a termination from the UI
        for pid in interrupted:
            _signal_group(pid, signal.SIGTERM)  # the run worker ends the run as canceled
        deadline = time.monotonic() + TERMINATE_WAIT_S
        while self.children and time.monotonic() < deadline:
            time.sleep(REAP_INTERVAL_S)
            self.reap()
        for pid in self.children:
            _signal_group(pid, signal.SIGKILL)
        self.reap(block=True)
        offer_again(self.instance, list(interrupted.values()))


def _signal_group(pid: int, signum: int) -> None:
    """The run worker leads its own process group (``setsid``): its subprocesses go with it."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def main() -> None:
    # stdout carries the protocol: keep it private so that prints (imports, runs) go to stderr.
    replies = os.fdopen(os.dup(1), "w")
    commands = os.dup(0)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # The daemon's signals (Ctrl-C, a restart) must not reach runs in flight; end of stdin stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zygote = Zygote(commands, replies)
    try:
        lines = None
        while not lines:
            lines = zygote.read_lines()
            if lines is None:
                raise SystemExit(0)
        zygote.load(json.loads(lines[0]))
    except BaseException:  # noqa: BLE001 - anything that stops loading is the launcher's error to show
        zygote.reply(error=traceback.format_exc())
        raise SystemExit(1)
    zygote.reply(ready=True)
    zygote.serve()


if __name__ == "__main__":
    main()
