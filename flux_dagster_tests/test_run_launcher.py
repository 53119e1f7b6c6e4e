"""``WarmRunLauncher``: runs forked from a warm zygote succeed with their whole event log, a dead
run worker is seen by Dagster's run monitoring, termination works from this process and from
elsewhere (a run marked CANCELING by another process), and a code reload gets a new zygote.

Real processes throughout: a gRPC code server for a small code location, the zygote, the run
workers. Every wait is bounded; no timing is asserted (timings are in bench/)."""

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterRunStatus, instance_for_test
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test, poll_for_finished_run
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from flux_dagster.launcher import WarmRunLauncher
from flux_dagster.launcher.launcher import HOST_TAG, PID_TAG

REPO = Path(__file__).resolve().parents[1]
LOCATION = "launcher_test"


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def deployment():
    """One instance (SQLite) with the warm launcher, and a workspace on a real gRPC code server."""
    overrides = {
        "run_launcher": {
            "module": "flux_dagster.launcher",
            "class": "WarmRunLauncher",
            "config": {"cancel_poll_interval_seconds": 0.2},
        },
    }
    with instance_for_test(overrides=overrides) as instance:
        target = ModuleTarget(module_name="flux_dagster_tests.fakes.code_location", attribute="defs",
                              working_directory=str(REPO), location_name=LOCATION)
        with WorkspaceProcessContext(instance, target) as process_context:
            yield instance, process_context


def launch(deployment, job_name: str):
    instance, process_context = deployment
    workspace = process_context.create_request_context()
    remote_job = workspace.get_code_location(LOCATION).get_repository("__repository__").get_full_job(job_name)
    run = create_run_for_test(instance, job_name=job_name, remote_job_origin=remote_job.get_remote_origin(),
                              job_code_origin=remote_job.get_python_origin())
    instance.launch_run(run.run_id, workspace)
    return instance.get_run_by_id(run.run_id)


def started(instance, run_id: str):
    return wait_until(lambda: (r := instance.get_run_by_id(run_id)).status == DagsterRunStatus.STARTED and r,
                      60, f"run {run_id} to start")


def test_the_configured_launcher_is_the_warm_one(deployment):
    instance, _ = deployment
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    assert instance.run_launcher.supports_check_run_worker_health


def test_runs_run_in_forked_workers_with_their_whole_event_log(deployment):
    instance, _ = deployment
    runs = [launch(deployment, "quick_job") for _ in range(2)]
    for run in runs:
        finished = poll_for_finished_run(instance, run.run_id, timeout=60)
        assert finished.status == DagsterRunStatus.SUCCESS
        events = instance.all_logs(run.run_id)
        types = [e.dagster_event.event_type for e in events if e.dagster_event]
        for expected in (DagsterEventType.RUN_STARTING, DagsterEventType.RUN_START, DagsterEventType.STEP_START,
                         DagsterEventType.STEP_OUTPUT, DagsterEventType.STEP_SUCCESS, DagsterEventType.RUN_SUCCESS):
            assert expected in types
        assert types.count(DagsterEventType.STEP_SUCCESS) == 2
        pid = finished.tags[PID_TAG]
        assert f"Started process for run (pid: {pid})." in [e.message for e in events]
        wait_until(lambda: f"Process for run exited (pid: {pid})." in [e.message for e in instance.all_logs(run.run_id)],
                   30, "the worker's exit event")
    pids = {instance.get_run_by_id(r.run_id).tags[PID_TAG] for r in runs}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # one fresh process per run
    zygotes = [z.process.pid for z in instance.run_launcher._zygotes.values()]
    assert len(zygotes) == 1 and str(zygotes[0]) not in pids  # both forked from one warm zygote


def test_a_killed_run_worker_is_detected_and_run_monitoring_fails_the_run(deployment):
    instance, process_context = deployment
    run = started(instance, launch(deployment, "slow_job").run_id)
    launcher = instance.run_launcher
    assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    os.kill(int(run.tags[PID_TAG]), signal.SIGKILL)
    health = wait_until(lambda: (h := launcher.check_run_worker_health(run)).status == WorkerStatus.FAILED and h,
                        30, "the dead worker to be reported")
    assert "killed by signal 9" in health.msg or "is gone" in health.msg
    # Dagster's own run monitoring, as the daemon calls it, now fails the run.
    monitor_started_run(instance, process_context.create_request_context(),
                        instance.get_run_record_by_id(run.run_id), logging.getLogger("test"))
    failed = instance.get_run_by_id(run.run_id)
    assert failed.status == DagsterRunStatus.FAILURE


def test_a_worker_on_another_host_is_not_judged_here(deployment):
    instance, _ = deployment
    run = poll_for_finished_run(instance, launch(deployment, "quick_job").run_id, timeout=60)
    elsewhere = run.with_tags({**run.tags, HOST_TAG: "some-other-host"})
    assert instance.run_launcher.check_run_worker_health(elsewhere).status == WorkerStatus.UNKNOWN


def test_terminate_cancels_a_running_run(deployment):
    instance, _ = deployment
    run = started(instance, launch(deployment, "slow_job").run_id)
    assert instance.run_launcher.terminate(run.run_id)
    finished = poll_for_finished_run(instance, run.run_id, timeout=60)
    assert finished.status == DagsterRunStatus.CANCELED
    types = [e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event]
    assert DagsterEventType.RUN_CANCELING in types and DagsterEventType.RUN_CANCELED in types
    assert not instance.run_launcher.terminate(run.run_id)  # already finished


def test_a_run_marked_canceling_elsewhere_is_interrupted_by_the_owning_launcher(deployment):
    """What the webserver's terminate() does when the worker is on another host: it only records
    CANCELING; the launcher that owns the worker sees it and interrupts the worker."""
    instance, _ = deployment
    run = started(instance, launch(deployment, "slow_job").run_id)
    instance.report_run_canceling(run)
    assert poll_for_finished_run(instance, run.run_id, timeout=60).status == DagsterRunStatus.CANCELED


def test_a_reloaded_code_location_gets_a_new_zygote(deployment):
    instance, process_context = deployment
    poll_for_finished_run(instance, launch(deployment, "quick_job").run_id, timeout=60)
    before = {z.process.pid for z in instance.run_launcher._zygotes.values()}
    process_context.reload_code_location(LOCATION)
    run = poll_for_finished_run(instance, launch(deployment, "quick_job").run_id, timeout=60)
    assert run.status == DagsterRunStatus.SUCCESS
    after = {z.process.pid for z in instance.run_launcher._zygotes.values()}
    assert after and after.isdisjoint(before)
