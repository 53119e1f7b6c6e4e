"""The warm process behind :class:`~flux_dagster.launcher.WarmRunLauncher`.

Started once per code location version by the launcher (``python -m flux_dagster.launcher.zygote``),
it imports Dagster, the storage classes and the code location, builds the instance, and then forks
run hosts (``run_host.py``): processes that each execute up to ``runs_per_host`` runs at once, one
thread per run. A fork of an idle, single-threaded, fully imported interpreter starts in
milliseconds and shares its memory pages with this process until it writes to them. Launches go to
the least busy host; up to ``host_processes`` hosts share the work (one per core by default), more
are forked only when all are full. A run whose executor starts step processes of its own
(``process_agent``'s multiprocess executor) gets a host of its own and runs on its main thread. A host that has taken ``max_runs_per_host`` runs takes no more
and exits once they are done (a fresh fork replaces it), so no process grows for ever. The zygote
itself never executes runs.

Protocol with the launcher, one JSON object per line. In on stdin: first ``{"instance_ref",
"repository_origin", "preload_modules", "pool_connections", "runs_per_host", "host_processes",
"max_runs_per_host"}``, then ``{"launch": run_id, "job": job_name}``. Out on the original stdout: ``{"ready": true}``
or ``{"error": text}`` once, then ``{"started": run_id, "pid"}`` per launch (the host's pid) and
``{"exited": run_id, "pid", "returncode"}`` per run ended (the host's own exit status for the runs
it had when it died; negative: killed by that signal). End of stdin (the launcher stopped, or its
daemon exited): stop launching, let the runs finish within ``FLUX_SHUTDOWN_GRACE_S``, terminate the
rest and offer their executions again (``shutdown.py``), exit.

Between the zygote and a host: run ids, one per line, on the host's stdin; ``run_id returncode``
lines back on a pipe. End of its stdin tells a host to finish its runs and exit.
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

# How often the zygote reaps exited hosts while nothing arrives.
REAP_INTERVAL_S = 0.2


class _LineReader:
    """Complete lines from a file descriptor, read directly: a buffered reader would keep lines
    that arrived together where select() cannot see them."""

    def __init__(self, fd: int):
        self.fd = fd
        self._pending = b""

    def read_lines(self) -> list[str] | None:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        return [line.decode() for line in lines if line]


class _Host:
    """The zygote's handle on one run host."""

    def __init__(self, pid: int, commands: int, replies: int):
        self.pid, self.commands, self.replies = pid, commands, _LineReader(replies)
        self.runs: set[str] = set()
        self.taken = 0
        self.retired = False

    def send(self, run_id: str) -> None:
        os.write(self.commands, f"{run_id}\n".encode())
        self.runs.add(run_id)
        self.taken += 1

    def retire(self) -> None:
        if not self.retired:
            self.retired = True
            os.close(self.commands)


def _serve_host(instance, commands: int, replies: int, setup: dict, exclusive: bool) -> int:
    """Body of a run host process: a thread per run id read from ``commands``; an exclusive host
    executes its one run on the main thread instead."""
    from flux_dagster.launcher.run_host import RunHost

    host = RunHost(instance, pool_connections=setup.get("pool_connections", True),
                   poll_interval_s=setup.get("cancel_poll_interval_seconds") or 1.0)
    out = os.fdopen(replies, "w")
    out_lock = threading.Lock()

    def _run(run_id: str) -> None:
        code = 1
        try:
            code = host.execute(run_id)
        finally:
            with out_lock:
                out.write(f"{run_id} {code}\n")
                out.flush()

    reader = _LineReader(commands)
    if exclusive:
        # Dagster's own interrupt handling (SIGTERM, on the main thread) stops the run, and
        # its executor forwards the stop to the step processes it started.
        for run_id in reader.read_lines() or []:
            _run(run_id)
        host.close()
        return 0
    # A shutdown (the zygote's drain) or an operator's SIGTERM: every run here ends as terminated.
    signal.signal(signal.SIGTERM, lambda *_: host.stop_all("The worker shut down."))
    threads = []
    while (lines := reader.read_lines()) is not None:
        for run_id in lines:
            thread = threading.Thread(target=_run, args=(run_id,), name=f"run-{run_id[:8]}")
            thread.start()
            threads.append(thread)
        threads = [t for t in threads if t.is_alive()]
    for thread in threads:
        thread.join()
    host.close()
    return 0


class Zygote:
    def __init__(self, commands, replies):
        self.commands, self.replies = _LineReader(commands), replies
        self.hosts: dict[int, _Host] = {}
        self.instance = None
        self.repository = None
        self._exclusive_jobs: dict[str | None, bool] = {}
        self.setup: dict = {}
        self.selector = selectors.DefaultSelector()
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
        self.repository = recon_repository_from_origin(origin)
        self.repository.get_definition()
        self.instance = DagsterInstance.from_ref(deserialize_value(setup["instance_ref"]))
        # Built here, once: Dagster's per-run dictConfig would deadlock runs sharing a host
        # (flux_dagster/instance.py).
        self.instance.get_handlers()
        self.setup = setup

    def _setting(self, name: str, default):
        return self.setup.get(name) or default

    def _exclusive(self, job_name: str | None) -> bool:
        """Whether the job's runs get a host of their own (``run_host.needs_main_thread``); asked
        once per job."""
        from flux_dagster.launcher.run_host import needs_main_thread

        if job_name not in self._exclusive_jobs:
            try:
                self._exclusive_jobs[job_name] = needs_main_thread(self.repository.get_definition().get_job(job_name))
            except Exception:  # noqa: BLE001 - unknown here: the run's own execution reports it
                return True
        return self._exclusive_jobs[job_name]

    def fork_host(self, exclusive: bool = False) -> _Host:
        if threading.active_count() > 1 and not self._warned_threads:
            self._warned_threads = True
            print("run zygote: a thread is running; forking anyway, but run hosts may hang", file=sys.stderr)
        # Without this, the host's first full collection walks (and so copies) every object it
        # shares with the zygote.
        gc.freeze()
        commands_r, commands_w = os.pipe()
        replies_r, replies_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()  # its own process group: a signal for the host reaches its subprocesses
                os.close(commands_w)
                os.close(replies_r)
                os.close(self.commands.fd)
                for other in self.hosts.values():  # else a host would never see the end of its stdin
                    if not other.retired:
                        os.close(other.commands)
                    os.close(other.replies.fd)
                self.replies.close()
                code = _serve_host(self.instance, commands_r, replies_w, self.setup, exclusive)
            except BaseException:  # noqa: BLE001 - report anything, then leave without the zygote's cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(commands_r)
        os.close(replies_w)
        host = _Host(pid, commands_w, replies_r)
        self.hosts[pid] = host
        self.selector.register(replies_r, selectors.EVENT_READ, host)
        return host

    def host_for_launch(self) -> _Host:
        open_hosts = [h for h in self.hosts.values() if not h.retired]
        free = [h for h in open_hosts if len(h.runs) < self._setting("runs_per_host", 100)]
        spread = len(open_hosts) < self._setting("host_processes", os.cpu_count() or 1)
        if not free or (spread and all(h.runs for h in free)):
            return self.fork_host()
        return min(free, key=lambda h: len(h.runs))

    def launch(self, run_id: str, job_name: str | None) -> None:
        exclusive = self._exclusive(job_name)
        while True:
            host = self.fork_host(exclusive=True) if exclusive else self.host_for_launch()
            try:
                host.send(run_id)
                break
            except OSError:  # it died just now: its exit is reported as it is reaped; use another
                host.retire()
        if exclusive or host.taken >= self._setting("max_runs_per_host", 1000):
            host.retire()  # it exits once its runs are done
        self.reply(started=run_id, pid=host.pid)

    def host_replied(self, host: _Host) -> None:
        lines = host.replies.read_lines()
        if lines is None:  # the host exited (or died): whatever it still had ends with it
            self.selector.unregister(host.replies.fd)
            os.close(host.replies.fd)
            _, status = os.waitpid(host.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            for run_id in sorted(host.runs):
                self.reply(exited=run_id, pid=host.pid, returncode=code if code else 1)
            if not host.retired:
                host.retire()
            del self.hosts[host.pid]
            return
        for line in lines:
            run_id, _, code = line.partition(" ")
            host.runs.discard(run_id)
            self.reply(exited=run_id, pid=host.pid, returncode=int(code or 1))

    def serve(self) -> None:
        self.selector.register(self.commands.fd, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select(REAP_INTERVAL_S):
                if key.data is not None:
                    self.host_replied(key.data)
                    continue
                lines = self.commands.read_lines()
                if lines is None:
                    self.selector.unregister(self.commands.fd)
                    self.drain()
                    return
                for line in lines:
                    message = json.loads(line)
                    self.launch(message["launch"], message.get("job"))

    def _wait_hosts(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.hosts and time.monotonic() < deadline:
            for key, _ in self.selector.select(REAP_INTERVAL_S):
                self.host_replied(key.data)

    def drain(self) -> None:
        """Shutdown: wait for the runs in flight, up to the grace period; then terminate them and
        offer their executions again, so none is left ``running``."""
        from flux_dagster.launcher.shutdown import TERMINATE_WAIT_S, offer_again, report_canceling, shutdown_grace_s

        for host in self.hosts.values():
            host.retire()
        self._wait_hosts(shutdown_grace_s())
        interrupted = [run_id for host in self.hosts.values() for run_id in host.runs]
        if not self.hosts:
            return
        report_canceling(self.instance, interrupted)  # as a termination from the UI
        for pid in list(self.hosts):
            _signal_group(pid, signal.SIGTERM)  # the host stops every run as terminated
        self._wait_hosts(TERMINATE_WAIT_S)
        for pid in list(self.hosts):
            _signal_group(pid, signal.SIGKILL)
        self._wait_hosts(TERMINATE_WAIT_S)
        offer_again(self.instance, interrupted)


def _signal_group(pid: int, signum: int) -> None:
    """A run host leads its own process group (``setsid``): its subprocesses go with it."""
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
            lines = zygote.commands.read_lines()
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
