"""The fault suite's world: a real deployment on a private Postgres (app DB and Dagster storage)
and a private Redis, loopback fakes of the main API and the LLM, and what is measured from
outside after a scenario: row statuses, runs, charges, generations, notifications."""

from __future__ import annotations

import os
import random
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select, text, update

from flux_dagster import demo, queue
from flux_dagster.db.engine import create_schema, get_engine, normalize_url, session_scope
from flux_dagster.db.models import Flow, FlowNode, NodeExecution, PendingExecution, utcnow
from flux_dagster.launcher.worker_process import PID_TAG
from flux_dagster_tests.deployment import TERMINAL, Deployment, postgres_database
from flux_dagster_tests.fakes.llm import FakeLlm
from flux_dagster_tests.fakes.main_api import FakeMainApi
from flux_dagster_tests.faults.services import PrivatePostgres, PrivateRedis

USER = "user-faults"
HARNESS = "flux-faults-harness"
STATUS_ORDER = {"PENDING": 0, "RUNNING": 1}  # then COMPLETED, FAILED or CANCELLED
# `make faults` runs the full burst sizes; the CI subset runs small ones.
FULL = os.environ.get("FLUX_FAULTS_FULL") == "1"


@dataclass(frozen=True)
class Execution:
    pending_id: int
    exec_id: str
    node_id: str


@dataclass(frozen=True)
class Run:
    run_id: str
    status: str
    pending_id: str | None
    parent_run_id: str | None
    worker_pid: int | None


def dagster_runs(engine) -> list[Run]:
    """Every run in the Dagster storage behind ``engine`` (Postgres), oldest first."""
    query = text(
        "SELECT r.run_id, r.status,"
        " max(CASE WHEN t.key = 'flux/pending_execution_id' THEN t.value END),"
        " max(CASE WHEN t.key = 'dagster/parent_run_id' THEN t.value END),"
        " max(CASE WHEN t.key = :pid_tag THEN t.value END)"
        " FROM runs r LEFT JOIN run_tags t ON t.run_id = r.run_id GROUP BY r.run_id, r.status, r.id ORDER BY r.id"
    )
    with engine.connect() as conn:
        return [Run(run_id, status, pid, parent, int(wpid) if wpid else None)
                for run_id, status, pid, parent, wpid in conn.execute(query, {"pid_tag": PID_TAG})]


@dataclass
class Outcome:
    """One row of the fault table."""

    fault: str
    executions: int
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0
    duplicate_runs: int = 0
    double_charges: int = 0
    unnotified: int = 0
    drain_s: float | None = None
    holds: str = "?"
    notes: list[str] = field(default_factory=list)


class World:
    """Everything one scenario runs against; ``close()`` stops it all (by PID)."""

    def __init__(self, pg: PrivatePostgres, tmp_path: Path, env_extra: dict[str, str] | None = None):
        self._stack = ExitStack()
        try:
            self._start(pg, tmp_path, env_extra)
        except BaseException:
            self._stack.close()  # a deployment that failed to start is stopped too
            raise

    def _start(self, pg: PrivatePostgres, tmp_path: Path, env_extra: dict[str, str] | None) -> None:
        self.pg = pg
        self.app_url = self._stack.enter_context(postgres_database(pg.admin_url))
        # The suite's own connections are named, so terminating the worker's spares them.
        self.harness_url = f"{self.app_url}?application_name={HARNESS}"
        self.dagster_url = self._stack.enter_context(postgres_database(pg.admin_url))
        self._stack.callback(lambda: get_engine(self.app_url).dispose())
        self._stack.callback(lambda: get_engine(self.harness_url).dispose())
        create_schema(self.app_url)
        with session_scope(self.app_url) as s:
            demo.seed(s)
        self.llm = self._stack.enter_context(FakeLlm())
        self.main_api = self._stack.enter_context(FakeMainApi())
        self.redis = PrivateRedis()
        self._stack.callback(self.redis.stop)
        self.redis.start()
        self.flow_id = str(uuid.uuid4())
        with session_scope(self.harness_url) as s:
            s.add(Flow(id=self.flow_id, name="faults", userId=USER))
        env = {
            "DAGSTER_PG_URL": self.dagster_url, "REDIS_URL": self.redis.url,
            "OPENAI_API_KEY": "sk-faults", "OPENAI_BASE_URL": f"{self.llm.url}/v1", "FLUX_LLM_MODE": "live",
            "URL_MAIN_API": self.main_api.url, "INTERNAL_API_KEY": self.main_api.api_key,
            # Production retry delays: the point is whether they outlast the outage.
            "FLUX_RETRY_DELAY_SCALE": "1",
            "FLUX_APICALLER_ALLOWED_HOSTS": "127.0.0.1/32", "FLUX_SQLQUERIER_ALLOWED_HOSTS": "127.0.0.1/32",
            **(env_extra or {}),
        }
        self.deployment = Deployment(tmp_path, self.app_url, env)
        self._stack.callback(self.deployment.stop)
        self.deployment.start()
        self._dagster_engine = create_engine(normalize_url(self.dagster_url), pool_pre_ping=True)
        self._stack.callback(self._dagster_engine.dispose)
        # One execution first, so the sensor, run queue and zygote are warm when the fault comes.
        if self.wait(self.burst(1), 240) is None:
            raise RuntimeError(f"the deployment did not run a first execution; see {self.deployment.log_path}")

    def close(self) -> None:
        self._stack.close()

    # --- inputs ----------------------------------------------------------------------------

    def add_nodes(self, n: int, node_type: str = "commandTextNode", data=None) -> list[str]:
        """``n`` nodes, one per execution; a text generator's prompt names its node, so the fake
        LLM can count generations per execution."""
        ids = [f"n-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        with session_scope(self.harness_url) as s:
            for node_id in ids:
                node_data = data if data is not None else {
                    "AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": f"Say hi. [{node_id}]"}
                s.add(FlowNode(flowId=self.flow_id, nodeId=node_id, type=node_type, data=node_data))
        return ids

    def enqueue(self, node_ids: list[str], kind: str = "node") -> list[Execution]:
        """One transaction: the whole burst appears at once, as the main API inserts it."""
        out = []
        with session_scope(self.harness_url) as s:
            for node_id in node_ids:
                exec_id = str(uuid.uuid4())
                row = queue.enqueue(s, kind=kind, exec_id=exec_id, flow_id=self.flow_id, node_id=node_id,
                                    user_id=USER, session_id="faults")
                out.append(Execution(row.id, exec_id, node_id))
        return out

    def burst(self, n: int, **node) -> list[Execution]:
        return self.enqueue(self.add_nodes(n, **node))

    def cancel(self, execution: Execution) -> str:
        """Request cancellation as the main API does; returns the row's status at that moment."""
        with session_scope(self.harness_url) as s:
            return s.execute(
                update(PendingExecution).where(PendingExecution.id == execution.pending_id)
                .values(cancel_requested_at=utcnow()).returning(PendingExecution.status)
            ).scalar_one()

    def terminate_app_db_connections(self) -> int:
        """pg_terminate_backend on every connection to the app DB (Dagster's storage is spared)."""
        name = self.app_url.rsplit("/", 1)[1]
        admin = create_engine(normalize_url(self.pg.admin_url), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                return len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :d AND application_name <> :harness AND pid <> pg_backend_pid()"
                ), {"d": name, "harness": HARNESS}).all())
        finally:
            admin.dispose()

    # --- observation -----------------------------------------------------------------------

    def rows(self, executions: list[Execution]) -> dict[int, PendingExecution]:
        ids = [e.pending_id for e in executions]
        with session_scope(self.harness_url) as s:
            return {r.id: r for r in s.scalars(select(PendingExecution).where(PendingExecution.id.in_(ids)))}

    def node_execution(self, execution: Execution) -> NodeExecution | None:
        with session_scope(self.harness_url) as s:
            return s.scalar(select(NodeExecution).where(NodeExecution.execId == execution.exec_id,
                                                        NodeExecution.nodeId == execution.node_id))

    def wait(self, executions: list[Execution], timeout_s: float, started: float | None = None,
             until=None) -> float | None:
        """Seconds from ``started`` until every row is terminal (and ``until()`` holds, when
        given), or None when ``timeout_s`` ran out first. Never asserts: a bound, not a goal."""
        started = started if started is not None else time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            rows = self.rows(executions)
            if all(r.status in TERMINAL for r in rows.values()) and (until is None or until()):
                return time.monotonic() - started
            time.sleep(0.5)
        return None

    def runs(self) -> list[Run]:
        return dagster_runs(self._dagster_engine)

    def runs_of(self, execution: Execution) -> list[Run]:
        return [r for r in self.runs() if r.pending_id == str(execution.pending_id)]

    def run_log(self, run_id: str) -> str:
        with self._dagster_engine.connect() as conn:
            return "\n".join(conn.scalars(text("SELECT event FROM event_logs WHERE run_id = :r ORDER BY id"),
                                          {"r": run_id}))

    def notified(self, execution: Execution) -> list[str]:
        """Statuses published on Redis for this execution's node, in order."""
        return [m["payload"]["nodes"][execution.node_id]["status"] for m in list(self.redis.messages)
                if m["payload"].get("execId") == execution.exec_id and execution.node_id in m["payload"]["nodes"]]

    def _unnotified(self, executions: list[Execution], rows: dict[int, PendingExecution]) -> list[Execution]:
        """Terminal rows whose last notification is not their final status, or whose statuses
        were published out of order (PENDING, RUNNING, then the final one)."""
        def wrong(e: Execution) -> bool:
            published = self.notified(e) or ["-"]
            # a re-execution or run retry starts a new PENDING cycle: order is checked within the last one
            last_cycle = published[max((i for i, s in enumerate(published) if s == "PENDING"), default=0):]
            ranks = [STATUS_ORDER.get(s, 2) for s in last_cycle]
            return published[-1] != rows[e.pending_id].status.upper() or ranks != sorted(ranks)

        return [e for e in executions if rows[e.pending_id].status in TERMINAL and wrong(e)]

    def outcome(self, fault: str, executions: list[Execution], drain_s: float | None,
                notify_grace_s: float = 30) -> Outcome:
        rows = self.rows(executions)
        deadline = time.monotonic() + notify_grace_s  # an outbox may publish a little after the row ends
        while self._unnotified(executions, rows) and time.monotonic() < deadline:
            time.sleep(0.5)
        runs = self.runs()
        by_row: dict[str, list[Run]] = {}
        for run in runs:
            by_row.setdefault(run.pending_id, []).append(run)
        keys = self.main_api.keys_by_execution()
        exec_ids = {e.exec_id for e in executions}
        statuses = [r.status for r in rows.values()]
        return Outcome(
            fault=fault, executions=len(executions),
            completed=statuses.count("completed"), failed=statuses.count("failed"),
            cancelled=statuses.count("cancelled"),
            lost=sum(s not in TERMINAL for s in statuses),
            # runs the sensor started beyond one per row (re-executions and run retries have a parent)
            duplicate_runs=sum(max(0, len([r for r in by_row.get(str(e.pending_id), []) if r.parent_run_id is None]) - 1)
                               for e in executions),
            double_charges=sum(len(k) - 1 for x, k in keys.items() if x in exec_ids and len(k) > 1),
            unnotified=len(self._unnotified(executions, rows)),
            drain_s=drain_s,
        )

    def failures(self, executions: list[Execution], limit: int = 3) -> list[str]:
        """A few distinct errors of failed rows, for the findings."""
        errors = {}
        for row in self.rows(executions).values():
            if row.status == "failed":
                errors.setdefault((row.error or "")[:200], row.id)
        return [f"row {i}: {e}" for e, i in list(errors.items())[:limit]]

    # --- operator actions ------------------------------------------------------------------

    def graphql(self, query: str, variables: dict) -> dict:
        url = getattr(self, "_graphql_url", None) or self.deployment.start_webserver()
        self._graphql_url = url
        response = httpx.post(url, json={"query": query, "variables": variables}, timeout=120)
        response.raise_for_status()
        return response.json()

    def reexecute(self, parent_run_id: str, strategy: str) -> str:
        """What the UI's "Re-execute" buttons send: launchPipelineReexecution (ALL_STEPS or FROM_FAILURE)."""
        answer = self.graphql(REEXECUTE, {"params": {"parentRunId": parent_run_id, "strategy": strategy}})
        launched = answer["data"]["launchPipelineReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", answer
        return launched["run"]["runId"]

    def wait_run(self, run_id: str, timeout_s: float = 180) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = next((r.status for r in self.runs() if r.run_id == run_id), None)
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(0.5)
        return None


REEXECUTE = """
mutation Reexecute($params: ReexecutionParams) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def random_moments(n: int, span_s: float, seed: int = 8) -> list[float]:
    rng = random.Random(seed)
    return sorted(rng.uniform(0, span_s) for _ in range(n))


class Later:
    """Run fault steps in the background while the burst drains; ``join()`` before measuring."""

    def __init__(self) -> None:
        import threading

        self._threading = threading
        self._threads: list = []
        self.errors: list[BaseException] = []

    def __call__(self, delay_s: float, *steps) -> None:
        def run():
            time.sleep(delay_s)
            try:
                for step in steps:
                    step() if callable(step) else time.sleep(step)
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)

        thread = self._threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(300)
        if self.errors:
            raise self.errors[0]
