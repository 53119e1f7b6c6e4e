"""Fixtures of the fault suite and its table: each scenario records one ``Outcome`` (measured
before anything is asserted), the verdict comes from the test's result, and the table is printed
at the end of the session and written to bench/results/faults.md."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from flux_dagster_tests.faults.harness import FULL, Outcome, World
from flux_dagster_tests.faults.services import PrivatePostgres

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.md"
_outcomes: dict[str, Outcome] = {}


@pytest.fixture(scope="session")
def private_pg():
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


LOGS = RESULTS.parent / "faults-logs"


def _keep_log(world: World, name: str) -> None:
    """The deployment's log of each scenario, for whoever reads a failure afterwards."""
    LOGS.mkdir(parents=True, exist_ok=True)
    if world.deployment.log_path.exists():
        shutil.copyfile(world.deployment.log_path, LOGS / f"{name}.log")


@pytest.fixture
def world(private_pg, tmp_path, request):
    running = World(private_pg, tmp_path)
    try:
        yield running
    finally:
        running.close()
        _keep_log(running, request.node.name)


@pytest.fixture(scope="module")
def shared_world(private_pg, tmp_path_factory, request):
    """One deployment for a module's scenarios that break nothing but their own execution."""
    running = World(private_pg, tmp_path_factory.mktemp("world"))
    try:
        yield running
    finally:
        running.close()
        _keep_log(running, request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture
def report(request):
    """``report(outcome)`` puts the scenario's row in the table."""

    def add(outcome: Outcome) -> Outcome:
        _outcomes[request.node.nodeid] = outcome
        return outcome

    return add


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    result = yield
    report = result.get_result()
    outcome = _outcomes.get(item.nodeid)
    if outcome is not None and report.when == "call":
        outcome.holds = "yes" if report.passed else "NO"
        if report.failed and call.excinfo is not None:
            outcome.notes.append(str(call.excinfo.value).splitlines()[0][:300])


def table(outcomes: list[Outcome]) -> str:
    head = ["fault", "executions", "completed", "failed", "cancelled", "lost", "duplicate runs", "double charges",
            "unnotified", "time to drain", "goal holds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in outcomes:
        drain = f"{o.drain_s:.0f} s" if o.drain_s is not None else "not drained"
        lines.append("| " + " | ".join(str(v) for v in (
            o.fault, o.executions, o.completed, o.failed, o.cancelled, o.lost, o.duplicate_runs, o.double_charges,
            o.unnotified, drain, o.holds)) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    outcomes = list(_outcomes.values())
    notes = [f"- {o.fault}: {n}" for o in outcomes for n in o.notes]
    body = (f"# Fault injection ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"commit {os.popen('git rev-parse --short HEAD 2>/dev/null').read().strip() or '?'})\n\n"
            + table(outcomes) + "\n" + ("\nWhy a goal does not hold:\n\n" + "\n".join(notes) + "\n" if notes else ""))
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line(body)
    if FULL:  # the CI subset's small bursts do not overwrite the last `make faults` table
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(body)
        terminalreporter.write_line(f"(written to {RESULTS})")
