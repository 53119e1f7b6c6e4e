"""Prometheus metrics, read on scrape from the app DB and Dagster's run storage and event log.

One small process (``flux-dagster metrics --port 9108``) holds the counters; run workers, the
daemon and the code server keep no metrics state, so nothing is lost when a run worker exits and
nothing has to be shared between processes. Counters advance incrementally from cursors (rows
finished, charges made and runs ended since the last scrape), so a purge never makes them go
backwards. ``docs/production.md`` lists the metrics.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import FlowNode, PendingExecution, TokenLedgerEntry, utcnow

# insert → completed, seconds: an execution takes ~1 s on the warm path, an agent minutes.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, float("inf"))
# This project's error classes (flux_dagster/errors.py): the label of a step's error.
ERROR_CLASSES = ("ProviderError", "IntegrationError", "ExecutionTimeoutError", "UserConfigError", "ExecutionCancelled",
                 "SystemError_")
QUEUE_STATUSES = ("pending", "launched", "running", "completed", "failed", "cancelled")
KEEP_SEEN_RUNS = 10_000


def error_class(error) -> str:
    """The FluxError class behind a step error (Dagster wraps it: look down the cause chain),
    else the innermost class."""
    innermost = "unknown"
    while error is not None:
        if error.cls_name in ERROR_CLASSES:
            return error.cls_name
        if error.cls_name:
            innermost = error.cls_name
        error = error.cause or error.context
    return innermost


def op_of(step_key: str | None) -> str:
    """``graph.op[mapping_key]`` → ``op``."""
    return re.sub(r"\[.*\]$", "", (step_key or "unknown").rsplit(".", 1)[-1])


class FluxCollector(Collector):
    """Everything is computed in ``collect`` (each scrape), under a lock."""

    def __init__(self, database_url: str, instance, settle_s: float = 2.0, lookback: timedelta = timedelta(hours=1)):
        self.database_url, self.instance, self.settle = database_url, instance, timedelta(seconds=settle_s)
        self._lock = threading.Lock()
        self._finished_until: datetime | None = None  # pending_executions.finished_at cursor
        self._charged_until: datetime | None = None  # token_ledger.updated_at cursor
        self._runs_after: datetime = utcnow() - lookback  # Dagster run update_timestamp cursor
        self._seen_runs: dict[str, None] = {}
        self.executions: Counter = Counter()
        self.latency_buckets: Counter = Counter()
        self.latency_sum: Counter = Counter()
        self.latency_count: Counter = Counter()
        self.tokens: Counter = Counter()
        self.retries: Counter = Counter()
        self.errors: Counter = Counter()

    # --- cursors -------------------------------------------------------------------------------

    def _advance_app_db(self, session, until: datetime) -> None:
        since = self._finished_until
        window = PendingExecution.finished_at <= until
        if since is not None:
            window = and_(window, PendingExecution.finished_at > since)
        # A node row is labelled with its node's type; agent and delivery rows with their kind.
        node_type = case((PendingExecution.kind != "node", PendingExecution.kind),
                         else_=func.coalesce(FlowNode.type, "unknown"))
        rows = session.execute(
            select(node_type, PendingExecution.status, PendingExecution.kind, PendingExecution.created_at,
                   PendingExecution.finished_at)
            .outerjoin(FlowNode, and_(FlowNode.flowId == PendingExecution.flow_id,
                                      FlowNode.nodeId == PendingExecution.node_id))
            .where(window)
        ).all()
        for kind_type, status, kind, created_at, finished_at in rows:
            self.executions[(kind_type, status)] += 1
            if status == "completed" and created_at and finished_at:
                seconds = max(0.0, (finished_at - created_at).total_seconds())
                self.latency_sum[kind] += seconds
                self.latency_count[kind] += 1
                for bound in LATENCY_BUCKETS:
                    if seconds <= bound:
                        self.latency_buckets[(kind, bound)] += 1
        self._finished_until = until

        charged = and_(TokenLedgerEntry.state == "charged", TokenLedgerEntry.updated_at <= until)
        if self._charged_until is not None:
            charged = and_(charged, TokenLedgerEntry.updated_at > self._charged_until)
        for ai_system, model, tokens_in, tokens_out in session.execute(
            select(TokenLedgerEntry.ai_system, TokenLedgerEntry.model, func.sum(TokenLedgerEntry.input_tokens),
                   func.sum(TokenLedgerEntry.output_tokens)).where(charged)
            .group_by(TokenLedgerEntry.ai_system, TokenLedgerEntry.model)
        ):
            self.tokens[(ai_system, model, "input")] += int(tokens_in or 0)
            self.tokens[(ai_system, model, "output")] += int(tokens_out or 0)
        self._charged_until = until

    def _advance_runs(self) -> None:
        from dagster import DagsterEventType, RunsFilter

        from flux_dagster.purge import FINISHED_RUN_STATUSES

        # A little overlap, so runs updated within the same instant are not missed; seen ones skip.
        records = self.instance.get_run_records(
            filters=RunsFilter(statuses=FINISHED_RUN_STATUSES, updated_after=self._runs_after - timedelta(seconds=5)),
            order_by="update_timestamp", ascending=True, limit=1000,
        )
        for record in records:
            run_id = record.dagster_run.run_id
            if run_id in self._seen_runs:
                continue
            for entry in self.instance.all_logs(
                run_id, of_type={DagsterEventType.STEP_UP_FOR_RETRY, DagsterEventType.STEP_FAILURE}
            ):
                event = entry.dagster_event
                labels = (op_of(event.step_key), error_class(getattr(event.event_specific_data, "error", None)))
                self.errors[labels] += 1
                if event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
                    self.retries[labels] += 1
            self._seen_runs[run_id] = None
            if len(self._seen_runs) > KEEP_SEEN_RUNS:
                del self._seen_runs[next(iter(self._seen_runs))]
            updated = record.update_timestamp
            updated = updated if updated.tzinfo else updated.replace(tzinfo=timezone.utc)
            self._runs_after = max(self._runs_after, updated)

    # --- exposition ----------------------------------------------------------------------------

    def collect(self):
        with self._lock, session_scope(self.database_url) as session:
            depth = dict.fromkeys(QUEUE_STATUSES, 0) | dict(session.execute(
                select(PendingExecution.status, func.count()).group_by(PendingExecution.status)).all())
            self._advance_app_db(session, utcnow() - self.settle)
            self._advance_runs()
            yield from self._families(depth)

    def _families(self, depth: dict[str, int]):
        queue = GaugeMetricFamily("flux_queue_executions", "pending_executions rows by status", labels=["status"])
        for status, n in sorted(depth.items()):
            queue.add_metric([status], n)
        yield queue
        executions = CounterMetricFamily("flux_executions", "Executions finished, by node type (the kind for "
                                         "agent and delivery rows) and outcome", labels=["node_type", "outcome"])
        for (node_type, outcome), n in sorted(self.executions.items()):
            executions.add_metric([node_type, outcome], n)
        yield executions
        latency = HistogramMetricFamily("flux_execution_latency_seconds", "Row inserted → execution "
                                        "completed, seconds", labels=["kind"])
        for kind in sorted(self.latency_count):
            buckets = [(str(b) if b != float("inf") else "+Inf", self.latency_buckets[(kind, b)]) for b in LATENCY_BUCKETS]
            latency.add_metric([kind], buckets, self.latency_sum[kind])
        yield latency
        retries = CounterMetricFamily("flux_step_retries", "Step attempts retried by their RetryPolicy, by op and "
                                      "error class", labels=["op", "error_class"])
        errors = CounterMetricFamily("flux_step_errors", "Step errors (retried or final), by op and error class; "
                                     "provider errors are error_class=ProviderError", labels=["op", "error_class"])
        for family, counts in ((retries, self.retries), (errors, self.errors)):
            for labels, n in sorted(counts.items()):
                family.add_metric(list(labels), n)
            yield family
        tokens = CounterMetricFamily("flux_tokens_charged", "Tokens charged (token_ledger)",
                                     labels=["ai_system", "model", "direction"])
        for labels, n in sorted(self.tokens.items()):
            tokens.add_metric(list(labels), n)
        yield tokens


def serve(host: str, port: int, database_url: str) -> None:
    """Block serving ``/metrics`` until interrupted."""
    from dagster import DagsterInstance
    from prometheus_client import REGISTRY, start_http_server

    with DagsterInstance.get() as instance:
        REGISTRY.register(FluxCollector(database_url, instance))
        server, thread = start_http_server(port, addr=host)
        try:
            thread.join()
        except KeyboardInterrupt:
            server.shutdown()
