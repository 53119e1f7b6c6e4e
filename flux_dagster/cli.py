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
    """Queue one execution, as the main API does."""
    from flux_dagster import queue
    from flux_dagster.db.engine import session_scope

    with session_scope(settings.database_url()) as session:
        row = queue.enqueue(session, kind=kind, exec_id=exec_id or str(uuid.uuid4()), flow_id=flow_id,
                            node_id=node_id, user_id=user_id, session_id=session_id, priority=priority)
        click.echo(f"queued pending execution {row.id} (execId {row.exec_id})")


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


def prepare_dagster_home() -> Path:
    """``$DAGSTER_HOME`` (default ``$FLUX_HOME/dagster``) holding the repository's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.flux_home() / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@main.command()
@click.option("--port", default=3000, show_default=True)
@click.option("--demo/--no-demo", default=True, help="Seed the demo flow and queue a few executions.")
def dev(port: int, demo: bool) -> None:
    """Run the worker (daemon + sensor) and the Dagster UI on the embedded defaults."""
    os.environ.setdefault("FLUX_HOME", str(settings.flux_home()))
    home = prepare_dagster_home()
    from flux_dagster.db.engine import create_schema

    create_schema(settings.database_url())
    if demo:
        seed.callback(executions=True)
    click.echo(f"DAGSTER_HOME={home}  app DB={_redact(settings.database_url())}  UI http://127.0.0.1:{port}")
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    os.chdir(REPO_ROOT)
    os.execv(dagster, [dagster, "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "0.0.0.0", "-p", str(port)])


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    main()
