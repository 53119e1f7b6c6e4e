"""Run a deployment process (``dagster dev``, ``dagster-daemon run``) so that stopping it leaves
no process behind.

Run workers live in their own sessions (so the terminal's Ctrl-C does not kill runs in flight)
and outlive the daemon by design: when the daemon stops, the zygote stops launching, lets the
runs in flight finish within ``FLUX_SHUTDOWN_GRACE_S``, then terminates the rest and offers their
executions again (``flux_dagster/launcher/zygote.py``). The supervisor makes itself the *child
subreaper* of everything it starts (Linux ``PR_SET_CHILD_SUBREAPER``), so those orphaned processes
become its children: it passes SIGTERM on, then waits for every descendant, and kills what
is still there after the grace period plus the zygote's own termination wait and ``KILL_MARGIN_S``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from flux_dagster.launcher.shutdown import TERMINATE_WAIT_S, shutdown_grace_s

PR_SET_CHILD_SUBREAPER = 36
KILL_MARGIN_S = 20.0


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a thread that starts a process is its parent)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(_children(child))
    return found


def _reap_all(deadline: float) -> list[int]:
    """Reap children (ours and adopted orphans) until none is left or the deadline passes;
    returns the pids still alive then."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid == 0:
            time.sleep(0.1)
    return descendants(os.getpid())


def supervise(argv: Sequence[str], grace_s: float | None = None) -> int:
    """Run ``argv`` as a child; pass SIGTERM on (a terminal's Ctrl-C already reaches the child);
    when it exits, wait for every process it left behind (grace period), kill the rest. Returns
    the child's exit code."""
    grace_s = shutdown_grace_s() if grace_s is None else grace_s
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.environ["FLUX_SHUTDOWN_GRACE_S"] = str(grace_s)  # the zygote reads the same grace period
    child = subprocess.Popen(list(argv))

    def forward(signum, _frame):
        # Ctrl-C reaches the whole foreground process group already; a SIGTERM (make dev killed,
        # ``docker stop``) reaches only us.
        if signum == signal.SIGTERM and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()
    leftovers = _reap_all(time.monotonic() + grace_s + TERMINATE_WAIT_S + KILL_MARGIN_S)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap_all(time.monotonic() + 5)
    return code
