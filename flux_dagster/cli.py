"""``flux-dagster``: set up the app DB, seed demo data, enqueue executions, watch the queue, and
run the worker with the Dagster UI on the embedded defaults."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import click

from flux_dagster import settings

REPO_ROOT = Path(__file__).resolve().parents[1]


@click.group()
def main() -> None:
    """FluxPrompt execution worker on Dagster."""


@main.command("create-schema")
def create_schema_cmd() -> None:
    """Create the main API's tables the worker uses and migrate this project's own tables."""
    from flux_dagster.db.engine import create_schema

    url = settings.database_url()
    create_schema(url)
    click.echo(f"schema ready in {_redact(url)}")


@main.command()
def migrate() -> None:
    """Production: migrate only this project's own tables (Alembic), never the main API's."""
    from flux_dagster.db.engine import migrate as migrate_own_tables

    url = settings.database_url()
    migrate_own_tables(url)
    click.echo(f"own tables migrated in {_redact(url)}")


@main.command()
@click.option("--executions/--no-executions", default=False, help="Also queue one execution per demo node.")
def seed(executions: bool) -> None:
    """Seed demo models, a demo flow and its nodes (idempotent)."""
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope

    with session_scope(settings.database_url()) as session:
        demo.seed(session)
        rows = demo.enqueue_demo_executions(session) if executions else []
    click.echo(f"demo flow {demo.DEMO_FLOW} seeded" + (f", {len(rows)} executions queued" if rows else ""))


@main.command()
@click.option("--flow", "flow_id", required=True)
@click.option("--node", "node_id", default=None, help="Node id (omit for an agent execution).")
@click.option("--user", "user_id", required=True)
@click.option("--session", "session_id", default=None)
@click.option("--kind", type=click.Choice(["node", "agent"]), default="node")
@click.option("--priority", type=int, default=0)
@click.option("--exec-id", default=None, help="Defaults to a new UUID.")
def enqueue(flow_id, node_id, user_id, session_id, kind, priority, exec_id) -> None:
    """Queue one execution, as the main API does. Refuses (exit 1, nothing written) an unknown
    flow or node, a node for an agent, an empty user or an exec id already queued."""
    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope

    with session_scope(settings.database_url()) as session:
        problem = enqueue_problem(session, flow_id, node_id, user_id, kind, exec_id)
        if problem:
            raise click.ClickException(problem)
        row = queue.enqueue(session, kind=kind, exec_id=exec_id or str(uuid.uuid4()), flow_id=flow_id,
                            node_id=node_id, user_id=user_id.strip(), session_id=session_id, priority=priority)
        click.echo(f"queued pending execution {row.id} (execId {row.exec_id})")


@main.command()
@click.argument("plan_file", type=click.File("r"))
@click.option("--user", "user_id", required=True)
@click.option("--exec-id", default=None, help="The run's execution id; defaults to a new UUID.")
def deliver(plan_file, user_id, exec_id) -> None:
    """Queue a delivery row (docs/deliveries.md) with the plan in PLAN_FILE (JSON), as the main API
    does after a run. Refuses (exit 1, nothing written) a plan that is not valid."""
    import json

    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope
    from flux_dagster.delivery.plan import parse_plan
    from flux_dagster.errors import UserConfigError

    try:
        raw = json.load(plan_file)
        plan = parse_plan(raw)
    except (ValueError, UserConfigError) as exc:
        raise click.ClickException(getattr(exc, "user_message", None) or f"Not JSON: {exc}") from exc
    with session_scope(settings.database_url()) as session:
        row = queue.enqueue(session, kind="delivery", exec_id=exec_id or str(uuid.uuid4()), flow_id=plan.flowId,
                            user_id=user_id.strip(), payload=raw)
        click.echo(f"queued delivery {row.id} ({len(plan.outputNodes)} output node(s))")


def enqueue_problem(session, flow_id: str, node_id: str | None, user_id: str, kind: str,
                    exec_id: str | None) -> str | None:
    """Why the main API would never queue this execution, or None."""
    from sqlalchemy import func, select

    from flux_dagster.db.models import Flow, FlowNode, PendingExecution

    if not user_id.strip():
        return "--user is empty."
    if session.get(Flow, flow_id) is None:
        return f"Flow {flow_id} does not exist in the app DB."
    if kind == "agent":
        if node_id:
            return "An agent execution runs the whole flow: omit --node (or use --kind node)."
        if not session.scalar(select(func.count()).select_from(FlowNode).where(FlowNode.flowId == flow_id)):
            return f"Flow {flow_id} has no nodes to run."
    else:
        if not node_id:
            return "--node is required for --kind node (omit it with --kind agent)."
        if session.scalar(select(FlowNode.id).where(FlowNode.flowId == flow_id, FlowNode.nodeId == node_id)) is None:
            return f"Node {node_id} is not a node of flow {flow_id}."
    if exec_id and session.scalar(select(PendingExecution.id).where(PendingExecution.exec_id == exec_id).limit(1)):
        return f"Execution {exec_id} is already queued; use a new --exec-id (or omit it)."
    return None


@main.command()
@click.argument("exec_id")
def rerun(exec_id: str) -> None:
    """Run an execution again on purpose: a new execution (new execId), generated and charged anew."""
    from flux_dagster.backfill import rerun as rerun_execution
    from flux_dagster.db.engine import session_scope

    with session_scope(settings.database_url()) as session:
        row = rerun_execution(session, exec_id)
        if row is None:
            raise click.ClickException(f"No execution with execId {exec_id}.")
        click.echo(f"queued pending execution {row.id} (new execId {row.exec_id}, a rerun of {exec_id})")


@main.command("queue")
@click.option("--limit", default=20, show_default=True)
def show_queue(limit: int) -> None:
    """Show the queue: counts by status and the latest rows."""
    from sqlalchemy import select

    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution

    with session_scope(settings.database_url()) as session:
        click.echo("  ".join(f"{k}={v}" for k, v in sorted(queue.queue_summary(session).items())) or "queue is empty")
        rows = session.scalars(select(PendingExecution).order_by(PendingExecution.id.desc()).limit(limit))
        for r in rows:
            click.echo(f"{r.id:>6} {r.kind:<5} {r.status:<9} exec={r.exec_id} node={r.node_id} "
                       f"run={r.dagster_run_id or '-'} {('error: ' + r.error) if r.error else ''}")


def prepare_dagster_home(copy_config: bool = True) -> Path:
    """``$DAGSTER_HOME`` (default ``$FLUX_HOME/dagster``) holding the repository's dagster.yaml
    (copied for ``dev``; other commands keep what is there, adding it only when missing)."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.flux_home() / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    if copy_config or not (home / "dagster.yaml").exists():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface of the UI; 0.0.0.0 exposes it, unauthenticated, to the network.")
@click.option("--port", default=3000, show_default=True)
@click.option("--demo/--no-demo", default=None,
              help="Queue the demo executions (default: only on the first start, on an empty queue).")
def dev(host: str, port: int, demo: bool | None) -> None:
    """Run the worker (daemon + sensor) and the Dagster UI on the embedded defaults."""
    _port_free_or_exit(host, port)
    os.environ.setdefault("FLUX_HOME", str(settings.flux_home()))
    home = prepare_dagster_home()
    from sqlalchemy import select

    from flux_dagster import demo as demo_data
    from flux_dagster.db.engine import create_schema, session_scope
    from flux_dagster.db.models import PendingExecution

    create_schema(settings.database_url())
    with session_scope(settings.database_url()) as session:
        first_start = session.scalar(select(PendingExecution.id).limit(1)) is None
        demo_data.seed(session)
        rows = demo_data.enqueue_demo_executions(session) if (first_start if demo is None else demo) else []
    click.echo(f"demo flow {demo_data.DEMO_FLOW} seeded" + (f", {len(rows)} executions queued" if rows else ""))
    click.echo(f"DAGSTER_HOME={home}  app DB={_redact(settings.database_url())}  UI http://{host}:{port}")
    from flux_dagster.supervisor import supervise

    os.chdir(REPO_ROOT)
    raise SystemExit(supervise([_bin("dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
                                "-h", host, "-p", str(port)]))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def daemon(ctx: click.Context) -> None:
    """``dagster-daemon run`` (arguments passed on) under the supervisor: SIGTERM lets runs in
    flight finish within FLUX_SHUTDOWN_GRACE_S, terminates and re-queues the rest, and leaves no
    process behind. The daemon container's command."""
    from flux_dagster.supervisor import supervise

    raise SystemExit(supervise([_bin("dagster-daemon"), "run", *ctx.args]))


@main.command("run-worker")
@click.option("--concurrency", default=100, show_default=True, help="Runs this worker executes at once (one thread each).")
@click.option("--loglevel", default="INFO", show_default=True)
def run_worker_cmd(concurrency: int, loglevel: str) -> None:
    """Execute runs sent by CeleryRunLauncher, on this machine (docs/multi-host.md). Broker and
    queue come from $DAGSTER_HOME/dagster.yaml, the same file (and storage) as the daemon's.
    SIGTERM: take no more runs, exit once those in flight are done."""
    from flux_dagster.launcher.celery_worker import run_worker

    prepare_dagster_home(copy_config=False)
    raise SystemExit(run_worker(concurrency, loglevel))


@main.command()
@click.option("--older-than-days", type=float, required=True, help="Keep this many days of history.")
@click.option("--batch-size", default=500, show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(older_than_days: float, batch_size: int, yes: bool) -> None:
    """Delete finished Dagster runs (with events, compute logs, step outputs) and terminal
    pending_executions / published status_notifications older than N days. Never the token
    ledger or the main API's tables. Same code as the ``purge_history`` job."""
    from dagster import DagsterInstance

    from flux_dagster.db.engine import session_scope
    from flux_dagster.purge import count_purgeable, cutoff_for, purge_history

    prepare_dagster_home(copy_config=False)
    url = settings.database_url()
    redis_configured = bool(settings.env("REDIS_URL"))
    cutoff = cutoff_for(older_than_days)
    with DagsterInstance.get() as instance:
        # Pooled storage connections, as in run workers: a purge makes a few storage calls per run,
        # and dagster-postgres otherwise opens a connection for each. A no-op on SQLite.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
        with session_scope(url) as session:
            planned = count_purgeable(instance, session, cutoff, redis_configured)
        click.echo(f"before {cutoff:%Y-%m-%d %H:%M} UTC: {planned.runs} runs, {planned.pending_executions} "
                   f"pending_executions rows, {planned.status_notifications} status_notifications rows")
        if not planned.total:
            return
        if not yes:
            click.confirm("Delete them?", abort=True)
        with click.progressbar(length=planned.total, label="purging") as bar:
            done = purge_history(instance, lambda: session_scope(url), cutoff, redis_configured,
                                 batch_size=batch_size, on_progress=bar.update)
    click.echo(f"deleted {done.runs} runs, {done.pending_executions} pending_executions rows, "
               f"{done.status_notifications} status_notifications rows")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9108, show_default=True)
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics, read from the app DB and Dagster's
    run storage and event log on each scrape (run workers keep no metrics state)."""
    from flux_dagster.metrics import serve

    prepare_dagster_home(copy_config=False)
    _port_free_or_exit(host, port)
    click.echo(f"metrics on http://{host}:{port}/metrics")
    serve(host, port, settings.database_url())


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def _port_free_or_exit(host: str, port: int) -> None:
    """Fail fast: a webserver whose port is taken would hang while everything else starts."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"Cannot listen on {host}:{port} ({exc.strerror}): another process uses it. "
                f"Stop it or pick another port, e.g. `make dev PORT={port + 1}`."
            ) from exc


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    main()
