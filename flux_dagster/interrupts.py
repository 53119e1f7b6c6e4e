"""Stopping the work of one run when many runs share a process.

A run host (``flux_dagster/launcher/run_host.py``) executes each run on a thread of its own, so a
termination or an op's deadline cannot be a signal to the process: it would stop every run. It is
an exception raised *in that run's thread*, and only while the thread is inside a node's body
(``interruptible``, entered by ``ops.retries.node_errors``), never in the middle of Dagster's own
bookkeeping (writing an event, handling a retry). A stop asked while the thread is elsewhere is
raised when it next enters a node's body. The exception is delivered with CPython's
``PyThreadState_SetAsyncExc``: at the thread's next bytecode, so a call blocked in C (a socket
read) ends at its own timeout first. On the main thread (one run per process, as under
``dagster api execute_run``) ``raise_after`` uses SIGALRM, which also ends a blocked call.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Stop(BaseException):
    """Delivered into a thread; ``interruptible`` turns it into the error that was asked for."""


_lock = threading.Lock()
_asked: dict[int, BaseException] = {}  # thread ident -> the error to raise there
_inside: set[int] = set()  # thread idents inside a node's body
_waking: dict[int, threading.Event] = {}  # thread idents in ``sleep``


def _deliver(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Stop))


def stop_thread(ident: int, error: BaseException) -> None:
    """Raise ``error`` in thread ``ident`` inside its current (or next) node body. A stop already
    asked for stays: the first reason wins."""
    with _lock:
        _ask(ident, error)


def _ask(ident: int, error: BaseException) -> None:
    if ident in _asked:
        return
    _asked[ident] = error
    if ident in _inside:
        _deliver(ident)
        if ident in _waking:
            _waking[ident].set()


def forget_thread(ident: int) -> None:
    """The thread is done with its run: a stop asked for it must not reach its next run."""
    with _lock:
        _asked.pop(ident, None)


@contextmanager
def interruptible() -> Iterator[None]:
    """The body of a node: where a stop asked for this thread is raised."""
    ident = threading.get_ident()
    with _lock:
        if ident in _asked:
            raise _asked.pop(ident)
        _inside.add(ident)
    try:
        yield
    except _Stop:
        with _lock:
            error = _asked.pop(ident, None)
        raise (error or RuntimeError("interrupted")) from None
    finally:
        with _lock:
            _inside.discard(ident)


# The deadlines of blocks running on other threads, watched by one thread per process (not a
# timer thread per op of every run).
_deadlines: dict[object, tuple[float, int, Callable[[], BaseException]]] = {}
_deadline_set = threading.Condition(_lock)
_watcher_pid: int | None = None


def _watch_deadlines() -> None:
    """Start this process's deadline watcher if it has none (a forked child has none). Under ``_lock``."""
    global _watcher_pid
    if _watcher_pid != os.getpid():
        _watcher_pid = os.getpid()
        threading.Thread(target=_expire_deadlines, name="deadlines", daemon=True).start()


def _expire_deadlines() -> None:
    with _lock:
        while True:
            now = time.monotonic()
            for token, (when, ident, make_error) in list(_deadlines.items()):
                if when <= now:
                    del _deadlines[token]
                    _ask(ident, make_error())
            nearest = min((when for when, _, _ in _deadlines.values()), default=None)
            _deadline_set.wait(None if nearest is None else nearest - now)


def sleep(seconds: float) -> None:
    """``time.sleep`` that a stop ends at once (a thread blocked in ``time.sleep`` would only see
    it when the sleep is over). On the main thread, plain ``time.sleep`` (SIGALRM ends it)."""
    if threading.current_thread() is threading.main_thread():
        time.sleep(seconds)
        return
    ident = threading.get_ident()
    woken = threading.Event()
    with _lock:
        if ident in _asked and ident in _inside:
            return  # the stop is on its way
        _waking[ident] = woken
    try:
        woken.wait(seconds)
    finally:
        with _lock:
            _waking.pop(ident, None)


@contextmanager
def raise_after(seconds: float, make_error: Callable[[], BaseException]) -> Iterator[None]:
    """Raise ``make_error()`` in this thread if the block is still running after ``seconds``.
    Meant inside ``interruptible`` (other threads) and on the main thread (SIGALRM; a timer that
    was set before, e.g. a test runner's, is restored with its remaining time)."""
    if threading.current_thread() is not threading.main_thread():
        token = object()
        with _lock:
            _watch_deadlines()
            _deadlines[token] = (time.monotonic() + seconds, threading.get_ident(), make_error)
            _deadline_set.notify()
        try:
            yield
        finally:
            with _lock:  # under the lock the watcher asks with: no deadline is asked after the block
                _deadlines.pop(token, None)
        return

    def _expired(signum, frame):
        raise make_error()

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, _expired)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 0.001))
