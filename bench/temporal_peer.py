"""The Temporal peer of issue 12: the demo ``summarize`` node executed the way the original
worker did it — ``temporal server start-dev`` plus one temporalio worker whose workflow runs one
activity per op of ``process_single_node`` — with each activity calling the *same plain
functions* the op calls (``flux_dagster.nodes``, ``execution``, ``queue``, ``failures``,
``services``), so the two deployments do the same work and only the engine differs.

- ``ProcessSingleNode``: the workflow (text generator path, display box branch, error path);
- ``PeerActivities``: the activities, over clients built once per worker process;
- ``run_peer()``: starts the server and the worker, runs the bursts and the sequential series
  against the loopback OpenAI server, and returns the figures ``bench/peer.py`` prints next to
  flux-dagster's;
- ``python -m bench.temporal_peer run`` prints those figures as JSON; ``… worker`` is the worker
  process ``run_peer`` starts.

The worker imports no Dagster: a Temporal worker would not carry it (~30 MB per process), so the
peer's clients are built here from the same environment variables as
``flux_dagster.resources.build_resources`` and its step table restates ``docs/retries.md``; both
are checked against the originals in ``flux_dagster_tests/test_temporal_peer.py``.

Needs a ``temporal`` CLI on PATH (or its path in ``FLUX_TEMPORAL_CLI``); without one
``run_peer`` raises ``PeerUnavailable`` and ``bench/peer_reference.json`` holds the figures
recorded on this machine class.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError as TemporalTimeoutError

# The workflow module is re-imported inside temporalio's sandbox: everything it imports besides
# temporalio is passed through (deterministic data types and plain functions the workflow code
# itself never calls with side effects).
with workflow.unsafe.imports_passed_through():
    import os

    from flux_dagster import demo, queue, settings
    from flux_dagster.db.engine import session_scope
    from flux_dagster.errors import (
        ExecutionCancelled, ExecutionTimeoutError, FluxError, IntegrationError, ProviderError, SystemError_,
        UserConfigError, classify,
    )
    from flux_dagster.execution import (
        ExecutionRequest, NodeOutcome, NodeTask, cancel_requested, completed_execution, format_stack, load_node,
        start_node_execution, write_execution_log,
    )
    from flux_dagster.failures import cancel_execution, fail_execution
    from flux_dagster.files.store import FileStore, LocalFileStore, MAX_LINK_EXPIRY_S, S3FileStore
    from flux_dagster.llm.providers import PROVIDERS, LlmClient, ProviderCredentials
    from flux_dagster.node_types import NODE_TYPES
    from flux_dagster.nodes import files
    from flux_dagster.nodes import text_generator as tg
    from flux_dagster.nodes.display_box import run_display_box
    from flux_dagster.services.main_api import MainApi
    from flux_dagster.services.notifications import Notifier

TASK_QUEUE = "flux-peer"
CANCELLED_MESSAGE = "The execution was cancelled."  # flux_dagster.ops.retries.CANCELLED_MESSAGE
# The branches of process_single_node this peer runs: the demo node's, and the display box.
PEER_BRANCHES = ("text_generator", "display_box")


@dataclass(frozen=True)
class Step:
    """An activity's retry rule and start-to-close timeout (docs/retries.md)."""

    retries: int
    first_delay_s: float
    deadline_s: float

    def retry_policy(self) -> RetryPolicy:
        # The same schedule as the ops: first delay doubling to at most 30 s (Temporal adds no
        # jitter); a non-retryable error ends the activity at once (ApplicationError.non_retryable).
        return RetryPolicy(initial_interval=timedelta(seconds=self.first_delay_s), backoff_coefficient=2.0,
                           maximum_interval=timedelta(seconds=30), maximum_attempts=self.retries + 1)


# op (= activity) name → its rule, as in flux_dagster/ops/retries.py (RETRY_POLICIES, OP_DEADLINES_S).
STEPS: dict[str, Step] = {
    "notify_status_pending": Step(9, 1.0, 60.0),
    "get_info_in_database": Step(9, 1.0, 60.0),
    "validate_model_access": Step(9, 1.0, 60.0),
    "text_generator": Step(9, 2.0, 600.0),
    "charge_tokens": Step(9, 1.0, 60.0),
    "generate_file": Step(9, 1.0, 600.0),
    "display_box": Step(9, 1.0, 600.0),
    "generate_execution_logs": Step(9, 1.0, 60.0),
    "notify_status_completed": Step(9, 1.0, 60.0),
    # Dagster's failure hook has no retry policy of its own; the original's error activity had
    # the node activities' rule.
    "node_execution_error": Step(9, 1.0, 60.0),
}
# An error's code → its class, to hand the error path the FluxError an activity failed with.
ERROR_CLASSES: dict[str, type[FluxError]] = {
    cls.code: cls for cls in (UserConfigError, IntegrationError, ProviderError, ExecutionTimeoutError, SystemError_)
}
MAX_RETRY_AFTER_S = 60.0


# --- the clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerServices:
    """What the activities call through, built once per worker process."""

    database_url: str
    main_api: MainApi
    notifier: Notifier
    llm: LlmClient
    file_store: FileStore

    @classmethod
    def from_env(cls) -> PeerServices:
        """The clients ``flux_dagster.resources.build_resources`` makes from the same variables."""
        url = settings.database_url()
        keys = {company: settings.env(spec.key_env) for company, spec in PROVIDERS.items()}
        credentials = {company: ProviderCredentials(api_key=key, base_url=settings.env(spec.base_url_env)
                                                    or spec.default_base_url)
                       for company, spec in PROVIDERS.items() if (key := keys[company])}
        mode = (settings.env("FLUX_LLM_MODE") or "auto").lower()
        bucket = settings.env("FLUX_FILES_BUCKET")
        store: FileStore = S3FileStore(
            bucket=bucket, prefix=settings.env("FLUX_FILES_PREFIX", ""), endpoint_url=settings.env("S3_ENDPOINT_URL"),
            region=settings.env("AWS_REGION"), access_key_id=settings.env("AWS_ACCESS_KEY_ID"),
            secret_access_key=settings.env("AWS_SECRET_ACCESS_KEY"), session_token=settings.env("AWS_SESSION_TOKEN"),
            link_expiry_s=int(settings.env("FLUX_FILES_LINK_EXPIRY_S", str(MAX_LINK_EXPIRY_S))),
        ) if bucket else LocalFileStore(settings.flux_home() / "files")
        return cls(
            database_url=url,
            main_api=MainApi(database_url=url, url=settings.env("URL_MAIN_API"), api_key=settings.env("INTERNAL_API_KEY")),
            notifier=Notifier(database_url=url, redis_url=settings.env("REDIS_URL"),
                              channel=os.environ.get("FLUX_STATUS_CHANNEL", "room_status_updated"),
                              stream_channel=os.environ.get("FLUX_STREAM_CHANNEL", "node_output_stream")),
            llm=LlmClient(credentials=credentials, offline=mode == "offline" or (mode == "auto" and not credentials)),
            file_store=store,
        )


# --- the activities ------------------------------------------------------------------------------


@contextmanager
def activity_errors():
    """``node_errors`` for an activity: any failure classified into the worker's error classes,
    retried by Temporal only when retryable, after at least the ``Retry-After`` asked for."""
    try:
        yield
    except Exception as exc:
        error = classify(exc)
        retry_after = min(error.retry_after_s, MAX_RETRY_AFTER_S) if error.retry_after_s else None
        failure = {"code": error.code, "user_message": error.user_message, "dev_message": error.dev_message,
                   "stack": format_stack(exc), "attempt": activity.info().attempt, "retryable": error.retryable}
        raise ApplicationError(
            error.user_message, failure, type=error.code, non_retryable=not error.retryable,
            next_retry_delay=timedelta(seconds=retry_after) if retry_after else None,
        ) from exc


def _run_id() -> str:
    """What the ops call the Dagster run id: the workflow run that owns the row."""
    return activity.info().workflow_run_id


class PeerActivities:
    """One activity per op of ``process_single_node`` (``flux_dagster/ops/``), each calling what
    its op calls. Sync activities: the worker runs them on its thread pool."""

    def __init__(self, services: PeerServices):
        self.s = services

    def all(self) -> list:
        return [getattr(self, name) for name in STEPS]

    @activity.defn(name="notify_status_pending")
    def notify_status_pending(self, request: ExecutionRequest) -> ExecutionRequest:
        """PENDING, and the row becomes ``running`` under this workflow run — unless it was
        cancelled meanwhile. (The op's "another run executes this row" check has no equivalent:
        the workflow id is the row's, so a row cannot be started twice.)"""
        with activity_errors():
            with session_scope(self.s.database_url) as session:
                row = queue.mark_running(session, request.pending_execution_id, _run_id())
                cancelled = row is not None and row.cancel_requested_at is not None
            if cancelled:
                raise ExecutionCancelled(CANCELLED_MESSAGE)
            self.s.notifier.publish(request, request.node_id, "PENDING")
        return request

    @activity.defn(name="get_info_in_database")
    def get_info_in_database(self, request: ExecutionRequest) -> NodeTask:
        with activity_errors(), session_scope(self.s.database_url) as session:
            task = load_node(session, request, request.node_id)
            node_type = NODE_TYPES.get(task.node_type)
            if node_type is None or node_type.branch not in PEER_BRANCHES:
                raise UserConfigError(f"Node type {task.node_type!r} is not supported by the Temporal peer "
                                      f"(it runs the branches {', '.join(PEER_BRANCHES)}).")
            start_node_execution(session, task, _run_id())
        return task

    @activity.defn(name="validate_model_access")
    def validate_model_access(self, task: NodeTask) -> NodeTask:
        with activity_errors():
            tg.validate_access(self.s.main_api, task)
        return task

    @activity.defn(name="text_generator")
    def text_generator(self, task: NodeTask) -> tg.TextGeneration:
        """The op's guard (cancelled? completed by an earlier run?), then the generation."""
        with activity_errors():
            with session_scope(self.s.database_url) as session:
                if cancel_requested(session, task.request.pending_execution_id):
                    raise ExecutionCancelled(CANCELLED_MESSAGE)
                earlier = completed_execution(session, task.request, task.node_id)
                if earlier is not None:
                    session.expunge(earlier)
            if earlier is not None:
                return tg.reused_generation(task, earlier)
            return tg.generate(self.s.database_url, self.s.llm, task, generation_id=f"{_run_id()}/text_generator",
                               main_api=self.s.main_api, notifier=self.s.notifier)

    @activity.defn(name="charge_tokens")
    def charge_tokens(self, task: NodeTask, generation: tg.TextGeneration) -> NodeOutcome:
        with activity_errors():
            outcome = tg.charge(self.s.main_api, task, generation)
        if not outcome.extra["charged"]:  # reference §3.5: logged, not fatal
            activity.logger.warning(f"Billing refused the charge {outcome.extra['idempotency_key']}")
        return outcome

    @activity.defn(name="generate_file")
    def generate_file(self, outcome: NodeOutcome) -> NodeOutcome:
        with activity_errors():
            return files.save_output_file(self.s.database_url, self.s.file_store, outcome)

    @activity.defn(name="display_box")
    def display_box(self, task: NodeTask) -> NodeOutcome:
        with activity_errors():
            return run_display_box(self.s.database_url, self.s.file_store, task)

    @activity.defn(name="generate_execution_logs")
    def generate_execution_logs(self, outcome: NodeOutcome) -> NodeOutcome:
        with activity_errors(), session_scope(self.s.database_url) as session:
            write_execution_log(session, outcome.task.request, outcome.task.node_id,
                                message=outcome.message, metadata=outcome.task.data)
        return outcome

    @activity.defn(name="notify_status_completed")
    def notify_status_completed(self, outcome: NodeOutcome) -> None:
        request = outcome.task.request
        with activity_errors():
            self.s.notifier.publish(request, outcome.task.node_id, "COMPLETED")
            with session_scope(self.s.database_url) as session:
                queue.finish(session, request.pending_execution_id, _run_id(), "completed")

    @activity.defn(name="node_execution_error")
    def node_execution_error(self, request: ExecutionRequest, failure: dict[str, Any]) -> str:
        """The error path, once: what the failure hook does (cancelled, or failed with the
        error's row, log, node status and FAILED notification)."""
        with activity_errors():
            if failure["code"] == ExecutionCancelled.code:
                cancel_execution(self.s.database_url, self.s.notifier, request.pending_execution_id, _run_id(),
                                 CANCELLED_MESSAGE)
                return "cancelled"
            error = ERROR_CLASSES.get(failure["code"], SystemError_)(failure["user_message"],
                                                                     dev_message=failure.get("dev_message"))
            fail_execution(self.s.database_url, self.s.notifier, request.pending_execution_id, _run_id(),
                           error, failure.get("stack") or "No stack")
            return "failed"


# --- the workflow --------------------------------------------------------------------------------


async def _step(method, *args):
    step = STEPS[method.__name__]
    return await workflow.execute_activity_method(
        method, args=list(args), start_to_close_timeout=timedelta(seconds=step.deadline_s),
        retry_policy=step.retry_policy())


def failure_of(exc: ActivityError) -> dict[str, Any]:
    """What the error path needs from a failed activity (the details ``activity_errors`` sent, or
    Temporal's own timeout)."""
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.details and isinstance(cause.details[0], dict):
        failure = dict(cause.details[0])
        if failure.get("retryable") and failure.get("attempt", 1) > 1:  # as the ops say it
            failure["user_message"] = f"{failure['user_message']} (gave up after {failure['attempt']} attempts)"
        return failure
    if isinstance(cause, TemporalTimeoutError):
        step = STEPS.get(exc.activity_type)
        limit = f" within {step.deadline_s:g} s" if step else ""
        message = f"The step {exc.activity_type} did not finish{limit}."
        return {"code": ExecutionTimeoutError.code, "user_message": message, "dev_message": message, "stack": ""}
    message = str(cause or exc)
    return {"code": SystemError_.code, "user_message": "The worker hit an internal error while running this node.",
            "dev_message": message, "stack": message}


@workflow.defn(name="ProcessSingleNode")
class ProcessSingleNode:
    """One node execution: PENDING, read the node, its branch, logs, COMPLETED; on a failed
    activity (after its retries) the error path once."""

    @workflow.run
    async def run(self, request: ExecutionRequest) -> str:
        try:
            request = await _step(PeerActivities.notify_status_pending, request)
            task = await _step(PeerActivities.get_info_in_database, request)
            if NODE_TYPES[task.node_type].branch == "display_box":
                outcome = await _step(PeerActivities.display_box, task)
            else:
                task = await _step(PeerActivities.validate_model_access, task)
                generation = await _step(PeerActivities.text_generator, task)
                outcome = await _step(PeerActivities.charge_tokens, task, generation)
                outcome = await _step(PeerActivities.generate_file, outcome)
            outcome = await _step(PeerActivities.generate_execution_logs, outcome)
            await _step(PeerActivities.notify_status_completed, outcome)
            return "completed"
        except ActivityError as exc:
            return await _step(PeerActivities.node_execution_error, request, failure_of(exc))


# --- the benchmark -------------------------------------------------------------------------------


class PeerUnavailable(RuntimeError):
    """No Temporal dev server can be started here."""


def temporal_cli() -> str:
    """The ``temporal`` CLI: ``FLUX_TEMPORAL_CLI``, else the one on PATH."""
    import shutil

    configured = os.environ.get("FLUX_TEMPORAL_CLI")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise PeerUnavailable(f"FLUX_TEMPORAL_CLI={configured} is not an executable file: the Temporal peer needs "
                                  "the Temporal CLI (`temporal server start-dev`).")
        return configured
    found = shutil.which("temporal")
    if found is None:
        raise PeerUnavailable("The Temporal peer needs the Temporal CLI (`temporal server start-dev`): no `temporal` "
                              "on PATH and FLUX_TEMPORAL_CLI is not set. Install the CLI (a single binary) and put it "
                              "on PATH or set FLUX_TEMPORAL_CLI to its path; bench/peer_reference.json holds the "
                              "figures recorded on this machine class meanwhile.")
    return found


# The keys of run_peer's result (bench/peer.py and bench/peer_reference.json use the same).
RESULT_KEYS = ("cpu_s_per_execution", "drain_s", "peak_in_flight", "peak_pg_connections", "sequential_p50_s",
               "peak_pss_mb", "extra_pss_per_in_flight_mb")
LATENCIES = {"50ms": 0.05, "2s": 2.0, "10s": 10.0}
APPLICATION_NAME = "flux-temporal-peer"  # the worker's Postgres connections, in pg_stat_activity


def run_peer(*, quick: bool = False, burst: int | None = None, sequential: int | None = None,
             latencies: dict[str, float] = LATENCIES, drain_bound_s: float = 900.0) -> dict[str, Any]:
    """Start the peer (dev server + one worker) on a fresh app database on the machine's
    Postgres, against the loopback OpenAI server, and measure it:

    - a burst of ``burst`` executions per LLM latency: CPU-s per execution over the server, the
      worker and the Postgres server (postmaster tree), and the time to drain;
    - peaks over the bursts: executions in flight (LLM requests open at once), the worker's
      Postgres connections, the sum of PSS of server + worker, and that sum's growth per
      execution in flight (the 10 s burst against the idle worker);
    - ``sequential`` executions one after the other at 50 ms, 0.5–2 s apart: insert → completed, p50.

    ``quick``: bursts of 50 and 5 sequential executions (else 200 and 12), as ``bench/peer.py``
    measures flux-dagster. An execution starts as with the original main API: the
    ``pending_executions`` row is inserted, then one workflow per row, its id the row's;
    completed = the row says so."""
    import asyncio

    burst = burst or (50 if quick else 200)
    sequential = sequential or (5 if quick else 12)
    return asyncio.run(_measure(temporal_cli(), burst, sequential, latencies, drain_bound_s))


class _Peaks:
    """Samples, every ``interval_s``: the sum of PSS over the peer's processes and the worker's
    Postgres connections."""

    def __init__(self, roots, admin_url: str, interval_s: float = 0.5):
        import threading

        from sqlalchemy import create_engine

        from flux_dagster.db.engine import normalize_url

        self.roots, self.interval_s = roots, interval_s
        self.admin = create_engine(normalize_url(admin_url), pool_size=1, max_overflow=0)
        self.pss_mb = self.pg_connections = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pss_now(self) -> float:
        from bench.harness import tree_pss_mb

        return tree_pss_mb(self.roots)

    def _run(self) -> None:
        from sqlalchemy import text

        while not self._stop.wait(self.interval_s):
            self.pss_mb = max(self.pss_mb, self.pss_now())
            try:
                with self.admin.connect() as conn:
                    count = conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                                        {"name": APPLICATION_NAME})
            except Exception:  # noqa: BLE001 - a missed sample only, not a stopped sampler
                continue
            self.pg_connections = max(self.pg_connections, count)

    def reset(self) -> None:
        self.pss_mb = self.pg_connections = 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.admin.dispose()


async def _measure(cli: str, burst: int, sequential: int, latencies: dict[str, float],
                   drain_bound_s: float) -> dict[str, Any]:
    import shutil
    import subprocess
    import sys
    import tempfile
    from contextlib import ExitStack
    from pathlib import Path

    import psutil
    from temporalio.client import Client

    from bench.harness import (
        PG_ADMIN_URL, REPO, _stop, free_port, in_flight_llm, pg_url, postgres_database, postgres_roots,
    )
    from flux_dagster.db.engine import create_schema

    with ExitStack() as stack:
        llm = stack.enter_context(in_flight_llm(latency_s=0.05))
        app_url = pg_url(stack.enter_context(postgres_database("flux_peer_app")))
        create_schema(app_url)
        with session_scope(app_url) as session:
            demo.seed(session)
        workdir = Path(tempfile.mkdtemp(prefix="flux-temporal-peer-"))
        stack.callback(shutil.rmtree, workdir, True)
        log_path = workdir / "peer.log"
        log = stack.enter_context(open(log_path, "w"))
        port = free_port()
        server = subprocess.Popen([cli, "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
                                   "--db-filename", str(workdir / "temporal.db")],
                                  stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop, server)
        target = f"127.0.0.1:{port}"
        client = await _connect(Client, target, server, log_path)
        env = {**os.environ, "FLUX_DATABASE_URL": f"{app_url}?application_name={APPLICATION_NAME}",
               "FLUX_HOME": str(workdir), "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{llm.url}/v1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        for name in ("URL_MAIN_API", "REDIS_URL", "FLUX_LLM_MODE", "FLUX_FILES_BUCKET"):  # the local defaults
            env.pop(name, None)
        worker = subprocess.Popen([sys.executable, "-m", "bench.temporal_peer", "worker", "--target", target],
                                  env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop, worker)
        _wait_for_line(log_path, "worker ready", worker, 120)
        return await measure(client, app_url, llm, [psutil.Process(server.pid), psutil.Process(worker.pid)],
                             postgres_roots(), PG_ADMIN_URL, burst=burst, sequential=sequential, latencies=latencies,
                             drain_bound_s=drain_bound_s)


async def measure(client, app_url: str, llm, roots: list, pg_roots: list, pg_admin_url: str, *, burst: int,
                  sequential: int, latencies: dict[str, float], drain_bound_s: float,
                  gap_s: tuple[float, float] = (0.5, 2.0)) -> dict[str, Any]:
    """``run_peer``'s figures, over a running deployment: ``client`` starts its workflows,
    ``roots`` are its processes, ``pg_roots`` the Postgres server's, ``llm`` an ``in_flight_llm``;
    ``gap_s``: the random pause before each sequential execution."""
    import asyncio
    import random
    import statistics
    import time

    from bench.harness import tree_cpu

    peaks = _Peaks(roots, pg_admin_url)
    try:
        bench = _Bench(client, app_url)
        llm.latency_s = 0.05
        await bench.execute(1, 120)  # warm-up: imports, first connections
        idle_pss = peaks.pss_now()
        samples, rng = [], random.Random(12)
        for _ in range(sequential):
            await asyncio.sleep(rng.uniform(*gap_s))
            [row] = await bench.execute(1, 60)
            samples.append(_epoch(row.finished_at) - _epoch(row.created_at))

        cpu, drain, in_flight, pss, pg_connections = {}, {}, {}, {}, {}
        for label, latency in latencies.items():
            llm.latency_s, llm.peak_open = latency, 0
            peaks.reset()
            cpu0 = tree_cpu(roots) + tree_cpu(pg_roots)
            started = time.time()
            rows = await bench.execute(burst, drain_bound_s)
            cpu[label] = (tree_cpu(roots) + tree_cpu(pg_roots) - cpu0) / burst
            drain[label] = max(_epoch(r.finished_at) for r in rows) - started
            in_flight[label], pss[label], pg_connections[label] = llm.peak_open, peaks.pss_mb, peaks.pg_connections
    finally:
        peaks.stop()
    slowest = max(latencies, key=latencies.get)  # the most executions in flight
    return {
        "cpu_s_per_execution": cpu, "drain_s": drain, "peak_in_flight": max(in_flight.values()),
        "peak_pg_connections": int(max(pg_connections.values())), "sequential_p50_s": statistics.median(samples),
        "peak_pss_mb": max(pss.values()),
        "extra_pss_per_in_flight_mb": (pss[slowest] - idle_pss) / max(in_flight[slowest], 1),
    }


async def _connect(client_class, target: str, server, log_path):
    """The dev server's frontend, once it answers (it listens before its namespace is ready)."""
    import asyncio
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            return await client_class.connect(target)
        except RuntimeError as exc:  # temporalio's "failed client connect"
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Temporal dev server never answered ({exc}); log:\n"
                                   f"{log_path.read_text()[-3000:]}") from exc
            await asyncio.sleep(0.5)


def _wait_for_line(log_path, line: str, process, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while line not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the peer's worker never started; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def _epoch(value) -> float:
    from datetime import timezone

    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


class _Bench:
    """The main API's part: rows in ``pending_executions``, one workflow per row."""

    def __init__(self, client, app_url: str):
        self.client, self.app_url = client, app_url

    async def execute(self, n: int, bound_s: float) -> list:
        """Insert ``n`` rows, start their workflows, wait (bounded) until every row is completed."""
        import asyncio
        import time
        import uuid

        from sqlalchemy import select

        from flux_dagster.db.models import PendingExecution

        with session_scope(self.app_url) as session:
            rows = [queue.enqueue(session, kind="node", exec_id=str(uuid.uuid4()), flow_id=demo.DEMO_FLOW,
                                  node_id="summarize", user_id=f"bench-user-{i % 10}", session_id="bench")
                    for i in range(n)]
            requests = [queue.request_of(row) for row in rows]
        await asyncio.gather(*(
            self.client.start_workflow(ProcessSingleNode.run, request, id=f"pending-execution-{request.pending_execution_id}",
                                       task_queue=TASK_QUEUE)
            for request in requests))
        ids = [r.pending_execution_id for r in requests]
        deadline = time.monotonic() + bound_s
        while True:
            with session_scope(self.app_url) as session:
                rows = list(session.scalars(select(PendingExecution).where(PendingExecution.id.in_(ids))))
            if all(r.status in ("completed", "failed", "cancelled") for r in rows):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sum(r.status != 'completed' for r in rows)} of {n} executions did not finish "
                                   f"within {bound_s:g} s")
            await asyncio.sleep(0.05 if n == 1 else 0.5)
        failed = [r for r in rows if r.status != "completed"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} executions did not complete; first: {failed[0].status}: "
                               f"{failed[0].error}")
        return rows


# --- the worker process --------------------------------------------------------------------------


async def serve(target: str, task_queue: str = TASK_QUEUE) -> None:
    """One temporalio worker: the workflow, the activities on a pool of 100 threads, at most 100
    activities at once (the worker's default)."""
    from concurrent.futures import ThreadPoolExecutor

    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(target)
    activities = PeerActivities(PeerServices.from_env())
    with ThreadPoolExecutor(100) as executor:
        worker = Worker(client, task_queue=task_queue, workflows=[ProcessSingleNode], activities=activities.all(),
                        activity_executor=executor, max_concurrent_activities=100)
        print("worker ready", flush=True)
        await worker.run()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import asyncio
    import json

    parser = argparse.ArgumentParser(description="The Temporal peer of issue 12.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="the peer's worker process (run_peer starts it)")
    worker.add_argument("--target", required=True, help="the dev server, host:port")
    worker.add_argument("--task-queue", default=TASK_QUEUE)
    run = commands.add_parser("run", help="start the peer, measure it, print the figures as JSON")
    run.add_argument("--quick", action="store_true", help="bursts of 50, 5 sequential executions")
    args = parser.parse_args(argv)
    if args.command == "worker":
        asyncio.run(serve(args.target, args.task_queue))
    else:
        print(json.dumps(run_peer(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
