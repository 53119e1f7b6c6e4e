"""``WarmRunLauncher``: runs executed by run hosts forked from a warm zygote succeed with their
whole event log, runs in flight share a host and are terminated one by one (from this process and
from elsewhere: a run marked CANCELING by another process), a dead host is seen by Dagster's run
monitoring (here by its exit, on another machine by its heartbeat), and a code reload gets a new
zygote.

Real processes throughout: a gRPC code server for a small code location, the zygote, the run
hosts. Every wait is bounded; no timing is asserted (timings are in bench/)."""

import logging
import os
import signal
import time
from pathlib import Path

import yaml

import pytest
from dagster import DagsterEventType, DagsterRunStatus, instance_for_test
from dagster._core.launcher import WorkerStatus
from dagster._record import copy
from dagster._core.test_utils import create_run_for_test, poll_for_finished_run
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from flux_dagster.launcher import WarmRunLauncher
from flux_dagster.launcher.run_host import HEARTBEAT_STALE_S, heartbeat_key
from flux_dagster.launcher.worker_process import HOST_TAG, PID_TAG, START_TAG

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
    deployed = yaml.safe_load((REPO / "dagster.yaml").read_text())
    overrides = {
        # As deployed: the instance class and compute logs that run hosts need.
        "instance_class": deployed["instance_class"],
        "compute_logs": deployed["compute_logs"],
        "run_launcher": {
            "module": "flux_dagster.launcher",
            "class": "WarmRunLauncher",
            "config": {"cancel_poll_interval_seconds": 0.2, "host_processes": 1, "runs_per_host": 3},
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
    zygotes = [z.process.pid for z in instance.run_launcher._zygotes.values()]
    assert len(zygotes) == 1 and not pids & {str(zygotes[0]), str(os.getpid())}  # hosts forked from the zygote


def test_runs_in_flight_share_a_host_and_are_terminated_one_by_one(deployment):
    instance, _ = deployment
    runs = [started(instance, launch(deployment, "slow_job").run_id) for _ in range(3)]
    assert len({r.tags[PID_TAG] for r in runs}) == 1  # one host, a thread per run
    # The host is full (runs_per_host 3): another host takes the next run.
    fourth = poll_for_finished_run(instance, launch(deployment, "quick_job").run_id, timeout=60)
    assert fourth.status == DagsterRunStatus.SUCCESS and fourth.tags[PID_TAG] != runs[0].tags[PID_TAG]
    assert instance.run_launcher.terminate(runs[0].run_id)
    assert poll_for_finished_run(instance, runs[0].run_id, timeout=60).status == DagsterRunStatus.CANCELED
    assert all(instance.get_run_by_id(r.run_id).status == DagsterRunStatus.STARTED for r in runs[1:])
    for run in runs[1:]:
        instance.run_launcher.terminate(run.run_id)
    for run in runs[1:]:
        assert poll_for_finished_run(instance, run.run_id, timeout=60).status == DagsterRunStatus.CANCELED


def test_a_killed_run_host_is_detected_and_run_monitoring_fails_its_runs(deployment):
    instance, process_context = deployment
    runs = [started(instance, launch(deployment, "slow_job").run_id) for _ in range(3)]
    launcher = instance.run_launcher
    killed = runs[0].tags[PID_TAG]
    assert launcher.check_run_worker_health(runs[0]).status == WorkerStatus.RUNNING
    os.kill(int(killed), signal.SIGKILL)
    for run in [r for r in runs if r.tags[PID_TAG] == killed]:  # every run the host had
        health = wait_until(lambda: (h := launcher.check_run_worker_health(run)).status == WorkerStatus.FAILED and h,
                            30, "the dead host to be reported")
        assert "killed by signal 9" in health.msg or "is gone" in health.msg
        # Dagster's own run monitoring, as the daemon calls it, now fails the run.
        monitor_started_run(instance, process_context.create_request_context(),
                            instance.get_run_record_by_id(run.run_id), logging.getLogger("test"))
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    for run in [r for r in runs if r.tags[PID_TAG] != killed]:
        launcher.terminate(run.run_id)
        assert poll_for_finished_run(instance, run.run_id, timeout=60).status == DagsterRunStatus.CANCELED


def test_a_host_on_another_machine_is_judged_by_its_heartbeat(deployment):
    instance, _ = deployment
    run = poll_for_finished_run(instance, launch(deployment, "quick_job").run_id, timeout=60)
    # As a run executed by a host on another machine: no exit status of it here.
    elsewhere = copy(run, run_id="run-on-another-machine", tags={**run.tags, HOST_TAG: "some-other-host"})
    health = instance.run_launcher.check_run_worker_health
    assert health(elsewhere).status == WorkerStatus.UNKNOWN  # no heartbeat yet
    key = heartbeat_key("some-other-host", run.tags[PID_TAG], run.tags[START_TAG])
    instance.run_storage.set_cursor_values({key: str(time.time())})
    assert health(elsewhere).status == WorkerStatus.RUNNING
    instance.run_storage.set_cursor_values({key: str(time.time() - HEARTBEAT_STALE_S - 1)})
    assert health(elsewhere).status == WorkerStatus.FAILED


def test_terminate_cancels_a_running_run(deployment):
    instance, _ = deployment
    run = started(instance, launch(deployment, "slow_job").run_id)
    assert instance.run_launcher.terminate(run.run_id)
    finished = poll_for_finished_run(instance, run.run_id, timeout=60)
    assert finished.status == DagsterRunStatus.CANCELED
    types = [e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event]
    assert DagsterEventType.RUN_CANCELING in types and DagsterEventType.RUN_CANCELED in types
    assert not instance.run_launcher.terminate(run.run_id)  # already finished


def test_a_run_marked_canceling_elsewhere_is_stopped_by_its_host(deployment):
    """What the webserver's terminate() does: it only records CANCELING; the host executing the
    run sees it and stops the run."""
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
