"""Runs on several hosts through Celery (docs/multi-host.md), on the machine's RabbitMQ with a
queue of each test's own.

- Against a small code location and a real ``flux-dagster run-worker`` (SQLite storage): runs
  execute on the worker's threads with their whole event log; termination of a run in flight, of
  a multiprocess-executor run (in a process of its own) and of a run no worker took yet; a second
  delivery of a task does not execute its run again.
- End to end: a real daemon and code server whose dagster.yaml launches with
  ``CeleryRunLauncher``, and two run workers standing for two hosts. One is SIGKILLed in the
  middle of a burst; every execution still completes, charged once, the killed host's runs
  re-executed on the other as Dagster run retries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import yaml
from sqlalchemy import create_engine, func, select, text

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, Definitions, job, multiprocess_executor, op
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test, poll_for_finished_run
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget

from flux_dagster import demo, interrupts, queue
from flux_dagster.db.engine import create_schema, get_engine, normalize_url, session_scope
from flux_dagster.db.models import Flow, FlowNode, TokenLedgerEntry
from flux_dagster.interrupts import interruptible
from flux_dagster.launcher.celery_launcher import TASK_NAME, CeleryRunLauncher
from flux_dagster.launcher.worker_process import HOST_TAG, PID_TAG, START_TAG
from flux_dagster_tests.conftest import add_flow, enqueue_agent
from flux_dagster_tests.deployment import BIN, REPO, Deployment, postgres_database, wait_terminal
from flux_dagster_tests.fakes.code_location import quick_job, slow_job
from flux_dagster_tests.faults.harness import dagster_runs

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_BROKER_URL = "redis://127.0.0.1:6379/0"
BURST = 30
CONCURRENCY = 8  # per worker: the burst is more than both hold, so some of it waits in the queue
IN_PROGRESS = ("NOT_STARTED", "QUEUED", "STARTING", "STARTED", "CANCELING")


@contextmanager
def own_queue():
    """A queue (and its exchange) of the test's own on the shared broker, deleted afterwards."""
    from kombu import Connection

    name = f"flux-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        with Connection(BROKER_URL) as connection:
            connection.default_channel.queue_delete(name)
            connection.default_channel.exchange_delete(name)


@pytest.fixture
def run_queue():
    with own_queue() as name:
        yield name


def use_celery_launcher(home: Path, **config) -> None:
    """``home``'s dagster.yaml launches with ``CeleryRunLauncher`` (on RabbitMQ unless
    ``config`` says otherwise)."""
    path = home / "dagster.yaml"
    instance_config = yaml.safe_load(path.read_text()) if path.exists() else {}
    instance_config["run_launcher"] = {
        "module": "flux_dagster.launcher.celery_launcher", "class": "CeleryRunLauncher",
        "config": {"broker_url": BROKER_URL, **config},
    }
    path.write_text(yaml.safe_dump(instance_config))


class Worker:
    """One ``flux-dagster run-worker`` process: a worker host."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [BIN / "flux-dagster", "run-worker", "--concurrency", str(concurrency)],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while "ready." not in self.log_path.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # Celery's warm shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


# ----- one worker, a small code location ---------------------------------------------------------


@op
def wait_in_steps() -> None:
    """A minute, in short sleeps: a step process of the multiprocess executor stops between them."""
    with interruptible():
        for _ in range(120):
            interrupts.sleep(0.5)


@job(executor_def=multiprocess_executor)
def slow_job_in_processes():
    wait_in_steps()


defs = Definitions(jobs=[quick_job, slow_job, slow_job_in_processes])
LOCATION = "celery_test"


@contextmanager
def one_worker(home: Path, **launcher_config):
    """An instance (SQLite) in ``home`` launching with CeleryRunLauncher, one run worker serving
    it, and a workspace on a real gRPC code server for this module's ``defs``."""
    home.mkdir(exist_ok=True)
    deployed = yaml.safe_load((REPO / "dagster.yaml").read_text())
    # As deployed: the instance class and compute logs that run hosts need.
    (home / "dagster.yaml").write_text(yaml.safe_dump({key: deployed[key] for key in ("instance_class", "compute_logs")}
                                                      | {"telemetry": {"enabled": False}}))
    use_celery_launcher(home, cancel_poll_interval_seconds=0.2, preload_modules=[__name__], **launcher_config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PG")} | {"DAGSTER_HOME": str(home)}
    worker = Worker(env, home / "worker.log", concurrency=4)
    try:
        instance = DagsterInstance.from_config(str(home))
        target = ModuleTarget(module_name=__name__, attribute="defs", working_directory=str(REPO),
                              location_name=LOCATION)
        with instance, WorkspaceProcessContext(instance, target) as process_context:
            worker.wait_ready()
            yield instance, process_context, worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def celery_instance(tmp_path_factory):
    with own_queue() as run_queue, one_worker(tmp_path_factory.mktemp("celery_home"), queue=run_queue) as running:
        yield running


def new_run(celery_instance, job_name: str):
    instance, process_context, _ = celery_instance
    workspace = process_context.create_request_context()
    remote_job = workspace.get_code_location(LOCATION).get_repository("__repository__").get_full_job(job_name)
    return create_run_for_test(instance, job_name=job_name, remote_job_origin=remote_job.get_remote_origin(),
                               job_code_origin=remote_job.get_python_origin())


def launch(celery_instance, job_name: str):
    instance, process_context, _ = celery_instance
    run = new_run(celery_instance, job_name)
    instance.launch_run(run.run_id, process_context.create_request_context())
    return run


def started(instance, run_id: str):
    return wait_for(lambda: (r := instance.get_run_by_id(run_id)).status == DagsterRunStatus.STARTED and r,
                    120, f"run {run_id} to start")


def messages(instance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id)]


def test_runs_execute_on_the_worker_with_their_whole_event_log(celery_instance):
    instance, _, worker = celery_instance
    launcher = instance.run_launcher
    assert isinstance(launcher, CeleryRunLauncher) and launcher.supports_check_run_worker_health
    runs = [launch(celery_instance, "quick_job") for _ in range(2)]
    for run in runs:
        finished = poll_for_finished_run(instance, run.run_id, timeout=120)
        assert finished.status == DagsterRunStatus.SUCCESS
        types = [e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event]
        assert types.count(DagsterEventType.STEP_SUCCESS) == 2 and DagsterEventType.RUN_SUCCESS in types
        assert finished.tags[PID_TAG] == str(worker.pid)  # on the worker's own threads
        assert any(m.startswith(f"Sent to Celery queue {launcher.queue}") for m in messages(instance, run.run_id))


def test_runs_in_flight_are_terminated_one_by_one(celery_instance):
    instance, _, worker = celery_instance
    launcher = instance.run_launcher
    runs = [started(instance, launch(celery_instance, "slow_job").run_id) for _ in range(2)]
    assert {r.tags[PID_TAG] for r in runs} == {str(worker.pid)}
    assert launcher.check_run_worker_health(runs[0]).status == WorkerStatus.RUNNING
    assert launcher.terminate(runs[0].run_id)
    assert poll_for_finished_run(instance, runs[0].run_id, timeout=60).status == DagsterRunStatus.CANCELED
    assert instance.get_run_by_id(runs[1].run_id).status == DagsterRunStatus.STARTED
    assert launcher.terminate(runs[1].run_id)
    assert poll_for_finished_run(instance, runs[1].run_id, timeout=60).status == DagsterRunStatus.CANCELED
    assert not launcher.terminate(runs[1].run_id)  # already finished


def test_a_multiprocess_run_has_a_process_of_its_own_and_is_terminated(celery_instance):
    """As ``process_agent``: its executor stops its step processes on the main thread's interrupt."""
    instance, _, worker = celery_instance
    run = started(instance, launch(celery_instance, "slow_job_in_processes").run_id)
    wait_for(lambda: any("Started execution of step" in (m or "") for m in messages(instance, run.run_id)), 120,
             "the step to start")
    assert run.tags[PID_TAG] != str(worker.pid)
    assert instance.run_launcher.terminate(run.run_id)
    assert poll_for_finished_run(instance, run.run_id, timeout=120).status == DagsterRunStatus.CANCELED


def test_a_second_delivery_does_not_execute_the_run_again(celery_instance):
    instance, _, _ = celery_instance
    run = poll_for_finished_run(instance, launch(celery_instance, "quick_job").run_id, timeout=120)
    instance.run_launcher.app.send_task(TASK_NAME, args=[run.run_id])  # as the broker redelivers it
    wait_for(lambda: any("got this run's task again" in (m or "") for m in messages(instance, run.run_id)), 60,
             "the worker to take the task again")
    events = instance.all_logs(run.run_id)
    assert [e.dagster_event.event_type for e in events if e.dagster_event].count(DagsterEventType.RUN_START) == 1
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS


def test_a_run_terminated_before_a_worker_took_it_ends_canceled(celery_instance):
    instance, process_context, _ = celery_instance
    run = new_run(celery_instance, "slow_job")
    assert instance.run_launcher.terminate(run.run_id)  # still NOT_STARTED: no host watches it
    instance.run_launcher.app.send_task(TASK_NAME, args=[run.run_id])
    assert poll_for_finished_run(instance, run.run_id, timeout=60).status == DagsterRunStatus.CANCELED
    assert "Terminated while no live run worker had it." in messages(instance, run.run_id)


def test_a_run_a_dead_worker_had_taken_is_executed(celery_instance):
    """The task of a worker that died after tagging the run, before starting it, is delivered
    again: the next worker executes the run."""
    instance, process_context, worker = celery_instance
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = new_run(celery_instance, "quick_job")
    instance.add_run_tags(run.run_id, {PID_TAG: str(gone.pid), HOST_TAG: socket.gethostname(), START_TAG: "1"})
    instance.launch_run(run.run_id, process_context.create_request_context())
    finished = poll_for_finished_run(instance, run.run_id, timeout=120)
    assert finished.status == DagsterRunStatus.SUCCESS and finished.tags[PID_TAG] == str(worker.pid)


def test_a_multiprocess_run_outlives_its_worker_and_is_still_terminable(tmp_path):
    """Its process is in a session of its own, with a run host of its own watching for the stop."""
    with own_queue() as run_queue, one_worker(tmp_path / "home", queue=run_queue) as running:
        instance, _, worker = running
        run = started(instance, launch(running, "slow_job_in_processes").run_id)
        worker.process.kill()
        worker.process.wait(10)
        assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
        assert instance.run_launcher.terminate(run.run_id)
        assert poll_for_finished_run(instance, run.run_id, timeout=120).status == DagsterRunStatus.CANCELED


def test_run_worker_refuses_an_instance_without_the_celery_launcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PG")} | {"DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())  # the warm launcher
    done = subprocess.run([BIN / "flux-dagster", "run-worker"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "must configure CeleryRunLauncher" in done.stderr, done.stderr[-2000:]


def test_redis_as_the_broker(tmp_path):
    """The same on Redis, its keys under a prefix of the test's own (deleted afterwards)."""
    prefix = f"flux-test-{uuid.uuid4().hex[:12]}:"
    try:
        with one_worker(tmp_path / "home", broker_url=REDIS_BROKER_URL, queue="flux-runs",
                        broker_transport_options={"global_keyprefix": prefix}) as running:
            instance = running[0]
            assert poll_for_finished_run(instance, launch(running, "quick_job").run_id,
                                         timeout=120).status == DagsterRunStatus.SUCCESS
            run = started(instance, launch(running, "slow_job").run_id)
            assert instance.run_launcher.terminate(run.run_id)
            assert poll_for_finished_run(instance, run.run_id, timeout=60).status == DagsterRunStatus.CANCELED
    finally:
        client = redis.Redis.from_url(REDIS_BROKER_URL)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


# ----- end to end: two worker hosts, one killed mid-burst ----------------------------------------


def add_nodes(app_url: str, n: int) -> tuple[str, list[str]]:
    """A flow of ``n`` text generators whose prompts name their node (the fake LLM counts
    generations per execution)."""
    flow_id = str(uuid.uuid4())
    ids = [f"n-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    with session_scope(app_url) as s:
        s.add(Flow(id=flow_id, name="celery", userId="user-1"))
        for node_id in ids:
            s.add(FlowNode(flowId=flow_id, nodeId=node_id, type="commandTextNode",
                           data={"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": f"Say hi. [{node_id}]"}))
    return flow_id, ids


def runs_logging(engine, needle: str) -> set[str]:
    """Runs with an event whose JSON mentions ``needle``."""
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT DISTINCT run_id FROM event_logs WHERE event LIKE :n"),
                                {"n": f"%{needle}%"}))


@pytest.mark.e2e
@pytest.mark.multihost
@pytest.mark.timeout(900)  # bounded waits inside; a loaded machine is slow, not wrong
def test_a_worker_host_killed_mid_burst_its_runs_finish_on_the_other(tmp_path, fake_llm, fake_main_api, run_queue):
    with postgres_database() as app_url, postgres_database() as dagster_url:
        create_schema(app_url)
        with session_scope(app_url) as s:
            demo.seed(s)
        flow_id, node_ids = add_nodes(app_url, BURST)
        # an agent (its multiprocess executor: a process of its own on the worker's machine)
        math = lambda f: ("mathFunction", {"formula": f, "variables": []})  # noqa: E731
        agent_flow = add_flow(app_url, {"x": math("1 + 2"), "y": math("3"), "z": math("4")}, [("x", "y"), ("x", "z")])
        env_extra = {"DAGSTER_PG_URL": dagster_url, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{fake_llm.url}/v1",
                     "URL_MAIN_API": fake_main_api.url, "INTERNAL_API_KEY": fake_main_api.api_key}
        deployment = Deployment(tmp_path, app_url, env_extra)
        use_celery_launcher(Path(deployment.env["DAGSTER_HOME"]), queue=run_queue,
                            preload_modules=["flux_dagster.definitions", "openai", "anthropic"])
        dagster = create_engine(normalize_url(dagster_url))
        workers: list[Worker] = []
        t0 = time.monotonic()
        try:
            workers = [Worker(deployment.env, tmp_path / f"worker-{name}.log", CONCURRENCY) for name in "ab"]
            deployment.start()
            for worker in workers:
                worker.wait_ready()
            doomed, survivor = workers
            fake_llm.latency_s = 3  # runs in flight on both hosts when one dies
            with session_scope(app_url) as s:
                ids = [queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                                     user_id="user-1", session_id="celery").id for node_id in node_ids]
            agent_id, _ = enqueue_agent(app_url, agent_flow)
            node_of = {str(i): n for i, n in zip(ids, node_ids)}
            burst_at = time.monotonic()
            print(f"\ndeployment and both workers up in {burst_at - t0:.0f} s")

            def in_llm_call_on_doomed() -> int:
                return sum(r.worker_pid == doomed.pid and r.status == "STARTED"
                           and bool(fake_llm.generations(node_of[r.pending_id])) for r in dagster_runs(dagster))

            wait_for(lambda: in_llm_call_on_doomed() >= 2, 240, "the first worker never had runs in an LLM call")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(10)
            killed_at = time.monotonic()
            fake_llm.latency_s = 0.2
            rows = wait_terminal(app_url, [*ids, agent_id], timeout_s=420)
            agent_row = rows.pop(agent_id)
            print(f"killed {killed_at - burst_at:.0f} s into the burst; every execution terminal "
                  f"{time.monotonic() - killed_at:.0f} s later")
            runs = wait_for(lambda: (rs := dagster_runs(dagster)) and not any(r.status in IN_PROGRESS for r in rs) and rs,
                            120, "runs still in progress")
            # runs the killed host had taken but not started (their task went to the other
            # host), and second deliveries of a task that were not executed
            taken_by_doomed = runs_logging(dagster, f"Started process for run (pid: {doomed.pid})")
            skipped = runs_logging(dagster, "got this run's task again")
        finally:
            for worker in workers:
                worker.stop()
            deployment.stop()
            dagster.dispose()
        with session_scope(app_url) as s:
            ledger = dict(s.execute(select(TokenLedgerEntry.exec_id, func.count()).where(TokenLedgerEntry.state == "charged")
                                    .group_by(TokenLedgerEntry.exec_id)).all())
        get_engine(app_url).dispose()

    exec_ids = {r.exec_id for r in rows.values()}
    killed = [r for r in runs if r.worker_pid == doomed.pid and r.status != "SUCCESS"]
    retries = [r for r in runs if r.parent_run_id is not None]
    handed_over = [r for r in runs if r.run_id in taken_by_doomed and r.worker_pid == survivor.pid]
    print(f"\n{BURST} executions, {len(runs)} runs: {len(taken_by_doomed)} taken by the killed host, "
          f"{len(killed)} of them cut short and retried on the other, {len(handed_over)} not yet started and "
          f"executed by the other; {sum(r.worker_pid == survivor.pid for r in runs)} runs on the other host; "
          f"{len(skipped)} second deliveries not executed; generations per execution: "
          f"{sorted({len(fake_llm.generations(n)) for n in node_ids})}")
    assert sorted(r.status for r in rows.values()) == ["completed"] * BURST, {i: (r.status, r.error) for i, r in rows.items()}
    # charged exactly once each: one charged ledger entry, one idempotency key at the main API
    assert ledger == {x: 1 for x in exec_ids}
    assert {x: len(k) for x, k in fake_main_api.keys_by_execution().items()} == {x: 1 for x in exec_ids}
    # one run per execution started by the sensor; every other run is a retry of a run cut short
    assert sorted(r.pending_id for r in runs if r.parent_run_id is None) == sorted(str(i) for i in [*ids, agent_id])
    # the agent completed in a process of its own, on neither worker's threads
    assert agent_row.status == "completed", agent_row.error
    [agent_run] = [r for r in runs if r.pending_id == str(agent_id)]
    assert agent_run.status == "SUCCESS" and agent_run.worker_pid not in (doomed.pid, survivor.pid)
    assert killed, "no run was cut short by the kill"
    by_parent = {r.parent_run_id: r for r in retries}
    for run in killed:
        assert run.status == "FAILURE", run
        retry = by_parent.get(run.run_id)
        assert retry is not None, f"run {run.run_id} cut short by the kill was not retried"
        assert (retry.status, retry.worker_pid) == ("SUCCESS", survivor.pid), retry
    assert not os.path.exists(f"/proc/{doomed.pid}")
