"""``PromptRunCoordinator``: a submitted run is launched at once while there is room and nothing is
queued; past ``max_concurrent_runs`` or a tag limit, or behind a queued run, it is queued as with
Dagster's ``QueuedRunCoordinator``; runs not requested by a sensor, and re-executions, are always
queued (the webserver may submit those). Runs are launched by Dagster's ``MockedRunLauncher`` (no process)."""

import pytest
from dagster import DagsterRunStatus, instance_for_test
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.test_utils import create_run_for_test

from flux_dagster.launcher.coordinator import PromptRunCoordinator


@pytest.fixture
def instance():
    overrides = {
        "run_coordinator": {
            "module": "flux_dagster.launcher.coordinator",
            "class": "PromptRunCoordinator",
            "config": {"max_concurrent_runs": 2,
                       "tag_concurrency_limits": [{"key": "flux/node_type", "value": "agent", "limit": 1}]},
        },
        "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"},
    }
    with instance_for_test(overrides=overrides) as instance:
        yield instance


ORIGIN = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("a_location"), "a_repository"), "a_job")


def submit(instance, sensor="pending_executions_sensor", **tags):
    tags = {**({"dagster/sensor_name": sensor} if sensor else {}), **tags}
    run = create_run_for_test(instance, job_name="a_job", tags=tags, remote_job_origin=ORIGIN)
    # The workspace only travels to the launcher, which the mocked one ignores.
    return instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=object())).status


def test_runs_launch_at_once_while_there_is_room_then_queue(instance):
    assert isinstance(instance.run_coordinator, PromptRunCoordinator)
    assert submit(instance) == DagsterRunStatus.STARTING
    assert submit(instance) == DagsterRunStatus.STARTING
    assert submit(instance) == DagsterRunStatus.QUEUED  # max_concurrent_runs 2


def test_a_tag_limit_queues_and_a_queued_run_goes_first(instance):
    assert submit(instance, **{"flux/node_type": "agent"}) == DagsterRunStatus.STARTING
    assert submit(instance, **{"flux/node_type": "agent"}) == DagsterRunStatus.QUEUED  # agent limit 1
    # Room for one more run overall, but a run is queued: this one waits behind it.
    assert submit(instance, **{"flux/node_type": "commandTextNode"}) == DagsterRunStatus.QUEUED


def test_a_run_not_requested_by_a_sensor_is_queued(instance):
    """Those may be submitted by the webserver: the daemon launches them, on its run hosts."""
    assert submit(instance, sensor=None) == DagsterRunStatus.QUEUED


def test_a_re_execution_is_queued(instance):
    assert submit(instance, **{"dagster/parent_run_id": "an-earlier-run"}) == DagsterRunStatus.QUEUED
