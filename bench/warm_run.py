"""The floor under the deployment's CPU figure: ``process_single_node`` runs one after another in
one warm process, through the run host's own path (``run_host.execute_run``), on Postgres storage,
against the loopback OpenAI server answering after 50 ms.

    .venv/bin/python -m bench.warm_run [--runs 40] [--node summarize]

Prints CPU-s per run of this process and of the Postgres backends serving its two databases,
wall time per run, the run's events by type and SQL statements per run. No daemon, code server or
queue: what is left is Dagster's run plus the node's work.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import psutil

from bench.harness import REPO, in_flight_llm, pg_url, postgres_backend_cpu, postgres_database


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--node", default="summarize", help="a node of the demo flow")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="flux-warm-run-"))
        stack.callback(shutil.rmtree, workdir, True)
        home = workdir / "dagster_home"
        home.mkdir()
        shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
        app_db = stack.enter_context(postgres_database("flux_warm_app"))
        dagster_db = stack.enter_context(postgres_database("flux_warm_dagster"))
        llm = stack.enter_context(in_flight_llm(latency_s=0.05))
        os.environ.update({"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": pg_url(dagster_db),
                           "FLUX_DATABASE_URL": pg_url(app_db), "FLUX_HOME": str(workdir),
                           "DAGSTER_TELEMETRY_DISABLED": "1", "OPENAI_API_KEY": "sk-bench",
                           "OPENAI_BASE_URL": f"{llm.url}/v1"})
        sys.path.insert(0, str(REPO))
        report(args, pg_url(app_db), [app_db, dagster_db])


def report(args, app_url: str, databases: list[str]) -> None:
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from flux_dagster import demo, queue
    from flux_dagster.db.engine import create_schema, session_scope
    from flux_dagster.launcher.run_host import execute_run
    from flux_dagster.sensors.pending_executions import run_request_for

    create_schema(app_url)
    with session_scope(app_url) as s:
        demo.seed(s)
    statements = collections.Counter()

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *_):
        statements[conn.engine.url.database] += 1

    recon_job = ReconstructableRepository.for_module("flux_dagster.definitions", "defs", str(REPO)) \
        .get_reconstructable_job("process_single_node")
    job_def = recon_job.get_definition()
    instance = DagsterInstance.get()
    instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)

    def one_run() -> str:
        with session_scope(app_url) as session:
            row = queue.enqueue(session, kind="node", exec_id=os.urandom(8).hex(), flow_id=demo.DEMO_FLOW,
                                node_id=args.node, user_id="bench-user", session_id="bench")
            pending_id = row.id
        with session_scope(app_url) as session:
            (claimed,) = [r for r in queue.claim_batch(session, 10, timedelta(seconds=60))
                          if r.id == pending_id]
            request = run_request_for(claimed, "commandTextNode")
        run = instance.create_run_for_job(job_def=job_def, run_config=request.run_config, tags=request.tags,
                                          job_code_origin=recon_job.get_python_origin())
        assert execute_run(instance, run.run_id) == 0
        return run.run_id

    for _ in range(3):  # warm: imports, pools, the SDK client
        one_run()
    me = psutil.Process()
    statements.clear()
    backends: dict[int, float] = {}
    cpu0, pg0, t0 = sum(me.cpu_times()[:2]), postgres_backend_cpu(databases, backends), time.perf_counter()
    run_ids = [one_run() for _ in range(args.runs)]
    cpu1, pg1, t1 = sum(me.cpu_times()[:2]), postgres_backend_cpu(databases, backends), time.perf_counter()
    n = args.runs
    status = instance.get_run_by_id(run_ids[-1]).status
    entries = [r.event_log_entry for r in instance.get_records_for_run(run_ids[-1], limit=10_000).records]
    events = collections.Counter(e.dagster_event.event_type_value if e.dagster_event else "log message" for e in entries)
    init_ms = []
    for run_id in run_ids:
        stamps = {r.event_log_entry.dagster_event.event_type_value: r.event_log_entry.timestamp
                  for r in instance.get_records_for_run(run_id, limit=10_000).records if r.event_log_entry.dagster_event}
        init_ms.append((stamps["RESOURCE_INIT_SUCCESS"] - stamps["RESOURCE_INIT_STARTED"]) * 1000)
    print(f"{n} runs of process_single_node ({args.node}), last run {status.value}")
    print(f"CPU-s per run: this process {(cpu1 - cpu0) / n:.3f}, Postgres backends {(pg1 - pg0) / n:.3f}, "
          f"total {(cpu1 - cpu0 + pg1 - pg0) / n:.3f}; wall {(t1 - t0) / n:.3f} s per run")
    print(f"SQL statements per run: {dict((k, round(v / n)) for k, v in statements.items())}")
    print(f"resource initialisation, p50 over the runs: {sorted(init_ms)[len(init_ms) // 2]:.0f} ms")
    print(f"events in one run: {sum(events.values())}: {dict(events.most_common())}")
    instance.dispose()


if __name__ == "__main__":
    main()
