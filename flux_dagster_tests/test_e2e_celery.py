"""Runs on several hosts through Celery (docs/multi-host.md): a real daemon and code server whose
dagster.yaml launches with ``CeleryRunLauncher`` on the machine's RabbitMQ, and two
``flux-dagster run-worker`` processes standing for two worker hosts. One is SIGKILLed in the
middle of a burst; every execution still completes, charged once, the killed host's runs
re-executed on the other as Dagster run retries."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, func, select, text

from flux_dagster import demo, queue
from flux_dagster.db.engine import create_schema, get_engine, normalize_url, session_scope
from flux_dagster.db.models import Flow, FlowNode, TokenLedgerEntry
from flux_dagster_tests.deployment import BIN, REPO, Deployment, postgres_database, wait_terminal
from flux_dagster_tests.faults.harness import dagster_runs

pytestmark = pytest.mark.e2e

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
BURST = 30
CONCURRENCY = 8  # per worker: the burst is more than both hold, so some of it waits in the queue
IN_PROGRESS = ("NOT_STARTED", "QUEUED", "STARTING", "STARTED", "CANCELING")


@pytest.fixture
def run_queue():
    """A queue (and its exchange) of this test's own on the shared broker, deleted afterwards."""
    from kombu import Connection

    name = f"flux-test-{uuid.uuid4().hex[:12]}"
    yield name
    with Connection(BROKER_URL) as connection:
        connection.default_channel.queue_delete(name)
        connection.default_channel.exchange_delete(name)


def use_celery_launcher(deployment: Deployment, run_queue: str) -> None:
    path = Path(deployment.env["DAGSTER_HOME"]) / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    config["run_launcher"] = {
        "module": "flux_dagster.launcher.celery_launcher", "class": "CeleryRunLauncher",
        "config": {"broker_url": BROKER_URL, "queue": run_queue},
    }
    path.write_text(yaml.safe_dump(config))


class Worker:
    """One ``flux-dagster run-worker`` process: a worker host."""

    def __init__(self, deployment: Deployment, name: str):
        self.log_path = deployment.tmp_path / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [BIN / "flux-dagster", "run-worker", "--concurrency", str(CONCURRENCY)],
            env=deployment.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = 120) -> None:
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


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return found


@pytest.mark.timeout(600)  # bounded waits inside; a loaded machine is slow, not wrong
def test_a_worker_host_killed_mid_burst_its_runs_finish_on_the_other(tmp_path, fake_llm, fake_main_api, run_queue):
    with postgres_database() as app_url, postgres_database() as dagster_url:
        create_schema(app_url)
        with session_scope(app_url) as s:
            demo.seed(s)
        flow_id, node_ids = add_nodes(app_url, BURST)
        env_extra = {"DAGSTER_PG_URL": dagster_url, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": f"{fake_llm.url}/v1",
                     "URL_MAIN_API": fake_main_api.url, "INTERNAL_API_KEY": fake_main_api.api_key}
        deployment = Deployment(tmp_path, app_url, env_extra)
        use_celery_launcher(deployment, run_queue)
        dagster = create_engine(normalize_url(dagster_url))
        workers: list[Worker] = []
        t0 = time.monotonic()
        try:
            workers = [Worker(deployment, "worker-a"), Worker(deployment, "worker-b")]
            deployment.start()
            for worker in workers:
                worker.wait_ready()
            doomed, survivor = workers
            fake_llm.latency_s = 3  # runs in flight on both hosts when one dies
            with session_scope(app_url) as s:
                ids = [queue.enqueue(s, kind="node", exec_id=str(uuid.uuid4()), flow_id=flow_id, node_id=node_id,
                                     user_id="user-1", session_id="celery").id for node_id in node_ids]
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
            rows = wait_terminal(app_url, ids, timeout_s=420)
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
    assert sorted(r.pending_id for r in runs if r.parent_run_id is None) == sorted(str(i) for i in ids)
    assert killed, "no run was cut short by the kill"
    by_parent = {r.parent_run_id: r for r in retries}
    assert {r.run_id for r in runs if r.worker_pid == doomed.pid} == {r.run_id for r in killed}
    for run in killed:
        assert run.status == "FAILURE", run
        retry = by_parent.get(run.run_id)
        assert retry is not None, f"run {run.run_id} cut short by the kill was not retried"
        assert (retry.status, retry.worker_pid) == ("SUCCESS", survivor.pid), retry
    assert not os.path.exists(f"/proc/{doomed.pid}")
