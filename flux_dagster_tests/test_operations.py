"""Operating it: the purge (job, CLI), the metrics endpoint scraped after executions ran, and the
strict CLI. Executions run in-process on a real instance built from the repository's dagster.yaml,
with Dagster's storage on SQLite and on Postgres."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import (
    PendingExecution, StatusNotification, TokenLedgerEntry, utcnow,
)
from flux_dagster.metrics import FluxCollector
from flux_dagster.purge import count_purgeable, purge_history
from flux_dagster_tests.conftest import add_node, execute_node, make_resources

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flux_dagster.cli"]
OPENAI_NODE = {"AiSystem": "openai", "aiModel": "gpt-4o-mini", "prompt": "Say hi."}


@pytest.fixture
def instance(app_db_url, tmp_path, monkeypatch):
    """A Dagster instance from the repository's dagster.yaml on a temp DAGSTER_HOME, its storage
    on the same database engine as the app DB."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    if app_db_url.startswith("postgres"):
        from flux_dagster_tests.test_e2e_daemon import postgres_database

        with postgres_database() as url:
            monkeypatch.setenv("DAGSTER_PG_URL", url)
            with DagsterInstance.get() as instance:
                yield instance
    else:
        monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
        with DagsterInstance.get() as instance:
            yield instance


def test_purge_deletes_old_runs_with_their_traces_and_old_rows_only(app_db_url, instance, fake_llm):
    resources = make_resources(app_db_url, llm_url=fake_llm.url)
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    old = execute_node(app_db_url, resources, flow_id, node_id, instance=instance)
    old_run = old.result.run_id
    step_outputs = Path(instance.storage_directory()) / old_run / "text_generator"
    step_outputs.mkdir(parents=True, exist_ok=True)  # what fs_io_manager writes in a deployed run
    (step_outputs / "result").write_bytes(b"pickle")
    cutoff = utcnow()
    new = execute_node(app_db_url, resources, flow_id, node_id, instance=instance)
    with session_scope(app_db_url) as s:
        ledger_before = s.scalar(select(func.count()).select_from(TokenLedgerEntry))
        s.add(PendingExecution(kind="node", exec_id="still-queued", flow_id=flow_id, node_id=node_id,
                               user_id="u", created_at=cutoff.replace(year=2020)))
        s.add(StatusNotification(room="r", payload={}, created_at=cutoff.replace(year=2020)))  # unpublished
    assert ledger_before == 2
    # Deployed runs capture no compute logs (NoOpComputeLogManager: runs share their host's stdout);
    # the purge still asks the configured manager to delete a run's, for deployments that capture.
    sqlite = not app_db_url.startswith("postgres")
    if sqlite:  # the run's own event log file
        shard = Path(instance.event_log_storage.path_for_shard(old_run))
        assert shard.exists()

    with session_scope(app_db_url) as s:
        planned = count_purgeable(instance, s, cutoff, redis_configured=True)
        notifications = s.scalar(select(func.count()).select_from(StatusNotification))
    # The old execution's two statuses were delivered (recorded, no Redis in these resources);
    # the unpublished 2020 one is the outbox.
    assert (planned.runs, planned.pending_executions, planned.status_notifications) == (1, 1, 2)
    progress = []
    done = purge_history(instance, lambda: session_scope(app_db_url), cutoff, redis_configured=True,
                         batch_size=1, on_progress=progress.append)

    assert (done.runs, done.pending_executions, done.status_notifications) == (1, 1, 2)
    assert sum(progress) == done.total
    assert instance.get_run_by_id(old_run) is None
    if sqlite:
        assert not shard.exists()
    else:
        assert instance.all_logs(old_run) == []
    assert not (Path(instance.storage_directory()) / old_run).exists()
    assert instance.get_run_tags(tag_keys=["flux/pending_execution_id"])[0][1] == {str(new.pending_id)}
    assert instance.get_run_by_id(new.result.run_id).status == DagsterRunStatus.SUCCESS
    assert instance.all_logs(new.result.run_id)
    with session_scope(app_db_url) as s:
        kept = {r.exec_id for r in s.scalars(select(PendingExecution))}
        assert kept == {new.exec_id, "still-queued"}  # old terminal row gone, a queued row never
        assert s.scalar(select(func.count()).select_from(TokenLedgerEntry)) == ledger_before
        # With Redis configured an unpublished notification is the outbox: kept.
        assert s.scalar(select(func.count()).select_from(StatusNotification)) == notifications - 2

    # The CLI: same function, everything finished so far (no Redis: notifications are the record).
    done = run_cli(app_db_url, "purge", "--older-than-days", "0", "--yes")
    assert done.exit_code == 0, done.output
    assert "deleted 1 runs, 1 pending_executions rows" in done.output
    assert instance.get_runs_count(RunsFilter()) == 0
    with session_scope(app_db_url) as s:
        assert s.scalar(select(func.count()).select_from(StatusNotification)) == 0
        assert s.scalar(select(func.count()).select_from(TokenLedgerEntry)) == ledger_before


def test_purge_deletes_runs_in_batches_with_their_asset_events(app_db_url, instance):
    """Batches of several runs (the statements take the batch's run ids at once): every run, event
    and asset-event tag of the batch goes, nothing of a run outside the cutoff."""
    from dagster import AssetMaterialization, job, op
    from dagster._core.storage.event_log.schema import AssetEventTagsTable, SqlEventLogStorageTable

    @op
    def report(context):
        context.log_event(AssetMaterialization("report", tags={"dagster/data_version": "1"}))

    @job
    def reports():
        report()

    old = [reports.execute_in_process(instance=instance).run_id for _ in range(3)]
    cutoff = utcnow()
    kept = reports.execute_in_process(instance=instance).run_id

    def asset_event_ids(run_ids):
        with instance.event_log_storage.index_connection() as conn:
            return conn.execute(select(SqlEventLogStorageTable.c.id).where(
                SqlEventLogStorageTable.c.run_id.in_(run_ids),
                SqlEventLogStorageTable.c.dagster_event_type == "ASSET_MATERIALIZATION")).scalars().all()

    def tagged(event_ids):
        with instance.event_log_storage.index_connection() as conn:
            return conn.scalar(select(func.count()).select_from(AssetEventTagsTable)
                               .where(AssetEventTagsTable.c.event_id.in_(event_ids)))

    old_events, kept_events = asset_event_ids(old), asset_event_ids([kept])
    assert len(old_events) == 3 and tagged(old_events) == 3

    progress = []
    done = purge_history(instance, lambda: session_scope(app_db_url), cutoff,
                         redis_configured=False, batch_size=2, on_progress=progress.append)

    assert done.runs == 3 and progress[:2] == [2, 1]
    assert all(instance.get_run_by_id(r) is None for r in old)
    if app_db_url.startswith("postgres"):
        assert all(instance.all_logs(r) == [] for r in old)
    else:  # each run's own event-log file
        assert not any(Path(instance.event_log_storage.path_for_shard(r)).exists() for r in old)
    assert tagged(old_events) == 0
    assert instance.get_run_by_id(kept) is not None and tagged(kept_events) == 1
    assert len(instance.all_logs(kept)) > 5


def test_purge_history_job_runs_on_the_instance(app_db_url, instance):
    from flux_dagster.definitions import defs
    from flux_dagster.resources import AppDatabase, NotifierResource

    database = AppDatabase(url=app_db_url)
    result = defs.get_job_def("purge_history").execute_in_process(
        instance=instance, resources={"app_db": database, "notifier": NotifierResource(database_url=database.url)},
        run_config={"ops": {"purge_history_op": {"config": {"older_than_days": 0}}}},
    )
    assert result.success and result.output_for_node("purge_history_op")["runs"] == 0
    assert defs.get_schedule_def("purge_history_daily").cron_schedule == "17 3 * * *"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(app_db_url: str, collector: FluxCollector) -> dict[str, dict[tuple, float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    port = _free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        server.shutdown()
    return {
        family.name: {(sample.name, *sorted(sample.labels.items())): sample.value for sample in family.samples}
        for family in text_string_to_metric_families(body)
    }


def test_metrics_scraped_after_executions_ran(app_db_url, instance, fake_llm):
    collector = FluxCollector(app_db_url, instance, settle_s=0)
    assert scrape(app_db_url, collector)["flux_queue_executions"][
        ("flux_queue_executions", ("status", "pending"))] == 0
    resources = make_resources(app_db_url, llm_url=fake_llm.url)
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    _, math_node = add_node(app_db_url, "mathFunction", {"formula": "1 +"}, flow_id=flow_id)
    fake_llm.failures = [429, 500]
    execute_node(app_db_url, resources, flow_id, node_id, instance=instance)
    fake_llm.failures = [400]
    execute_node(app_db_url, resources, flow_id, node_id, instance=instance)
    execute_node(app_db_url, resources, flow_id, math_node, instance=instance)
    with session_scope(app_db_url) as s:
        s.add(PendingExecution(kind="node", exec_id="queued", flow_id=flow_id, node_id=node_id, user_id="u"))

    metrics = scrape(app_db_url, collector)
    assert metrics["flux_queue_executions"][("flux_queue_executions", ("status", "pending"))] == 1
    assert metrics["flux_queue_executions"][("flux_queue_executions", ("status", "completed"))] == 1
    executions = metrics["flux_executions"]
    assert executions[("flux_executions_total", ("node_type", "commandTextNode"), ("outcome", "completed"))] == 1
    assert executions[("flux_executions_total", ("node_type", "commandTextNode"), ("outcome", "failed"))] == 1
    assert executions[("flux_executions_total", ("node_type", "mathFunction"), ("outcome", "failed"))] == 1
    latency = metrics["flux_execution_latency_seconds"]
    assert latency[("flux_execution_latency_seconds_count", ("kind", "node"))] == 1
    assert latency[("flux_execution_latency_seconds_bucket", ("kind", "node"), ("le", "+Inf"))] == 1
    retries = metrics["flux_step_retries"]
    assert retries[("flux_step_retries_total", ("error_class", "ProviderError"), ("op", "text_generator"))] == 2
    errors = metrics["flux_step_errors"]
    assert errors[("flux_step_errors_total", ("error_class", "ProviderError"), ("op", "text_generator"))] == 3
    assert errors[("flux_step_errors_total", ("error_class", "UserConfigError"), ("op", "math_function"))] == 1
    tokens = metrics["flux_tokens_charged"]
    assert tokens[("flux_tokens_charged_total", ("ai_system", "openai"), ("direction", "input"),
                   ("model", "gpt-4o-mini"))] == fake_llm.input_tokens

    # Counters never go back: a purge removes rows, the totals stay.
    purge_history(instance, lambda: session_scope(app_db_url), utcnow(), redis_configured=False)
    again = scrape(app_db_url, collector)
    assert again["flux_executions"] == executions and again["flux_step_retries"] == retries


def run_cli(app_db_url: str, *args: str):
    from click.testing import CliRunner

    from flux_dagster.cli import main

    return CliRunner().invoke(main, list(args), env={"FLUX_DATABASE_URL": app_db_url})


@pytest.mark.parametrize("args, message", [
    (["--flow", "no-such-flow", "--node", "n"], "Flow no-such-flow does not exist"),
    (["--node", "no-such-node"], "is not a node of flow"),
    (["--node", "{node}", "--user", " "], "--user is empty"),
    (["--kind", "agent", "--node", "{node}"], "omit --node"),
    (["--kind", "node"], "--node is required"),
    (["--node", "{node}", "--exec-id", "taken"], "already queued"),
])
def test_enqueue_refuses_what_the_main_api_never_queues(app_db_url, args, message):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    with session_scope(app_db_url) as s:
        s.add(PendingExecution(kind="node", exec_id="taken", flow_id=flow_id, node_id=node_id, user_id="u"))
    args = [a.replace("{node}", node_id) for a in args]
    if "--flow" not in args:
        args = ["--flow", flow_id, *args]
    if "--user" not in args:
        args += ["--user", "user-1"]
    done = run_cli(app_db_url, "enqueue", *args)
    assert done.exit_code == 1 and message in done.output, done.output
    with session_scope(app_db_url) as s:
        assert s.scalar(select(func.count()).select_from(PendingExecution)) == 1


def test_enqueue_accepts_a_known_node_and_agent(app_db_url):
    flow_id, node_id = add_node(app_db_url, "commandTextNode", OPENAI_NODE)
    assert run_cli(app_db_url, "enqueue", "--flow", flow_id, "--node", node_id, "--user", "u").exit_code == 0
    assert run_cli(app_db_url, "enqueue", "--flow", flow_id, "--kind", "agent", "--user", "u").exit_code == 0
    with session_scope(app_db_url) as s:
        assert sorted(r.kind for r in s.scalars(select(PendingExecution))) == ["agent", "node"]


def test_dev_fails_fast_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*CLI, "dev", "--port", str(port)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "FLUX_HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 1 and f"Cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert not (tmp_path / "app.db").exists()  # nothing started, nothing written


def test_requeue_backfill_covers_today():
    from flux_dagster.jobs.requeue_failed_executions import daily

    assert daily.get_last_partition_key() == utcnow().strftime("%Y-%m-%d")
