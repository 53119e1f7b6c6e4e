"""``flux_dagster.interrupts`` on a run's thread (as in a run host): a deadline or a stop is raised
inside the node's body, a wait ends at once, and nothing asked for one block reaches the next."""

import threading

import pytest

from flux_dagster import interrupts
from flux_dagster.interrupts import interruptible, raise_after


def on_a_thread(body):
    """Run ``body`` on a thread of its own; its exception (or None), bounded wait."""
    outcome = {}

    def _run():
        try:
            body()
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            outcome["error"] = exc

    thread = threading.Thread(target=_run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the thread was not stopped"
    return outcome["error"]


def test_a_deadline_ends_a_wait_inside_a_node_body():
    def body():
        with interruptible(), raise_after(0.2, lambda: TimeoutError("past its deadline")):
            interrupts.sleep(600)

    error = on_a_thread(body)
    assert isinstance(error, TimeoutError) and "past its deadline" in str(error)


def test_a_block_that_ends_in_time_leaves_nothing_for_the_next():
    def body():
        for _ in range(3):
            with interruptible(), raise_after(60, lambda: TimeoutError("not this one")):
                pass
        with interruptible():
            interrupts.sleep(0.01)

    assert on_a_thread(body) is None


def test_a_stop_asked_between_nodes_is_raised_when_the_next_node_starts():
    started, asked = threading.Event(), threading.Event()

    def body():
        started.set()
        asked.wait(30)
        with interruptible():
            pytest.fail("the node body ran after the stop")

    thread_error = {}

    def run():
        try:
            body()
        except BaseException as exc:  # noqa: BLE001
            thread_error["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(30)
    interrupts.stop_thread(thread.ident, RuntimeError("terminated"))
    asked.set()
    thread.join(30)
    assert isinstance(thread_error.get("error"), RuntimeError)
    interrupts.forget_thread(thread.ident)
