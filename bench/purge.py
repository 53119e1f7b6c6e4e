"""Purge rate on a synthetic history, and the latency a running deployment sees during a purge.

    .venv/bin/python -m bench.purge                      # 100,000 runs, SQLite and Postgres
    .venv/bin/python -m bench.purge --runs 2000 --storage sqlite   # a quick look

Per storage: a real code server + daemon (``bench/harness.py``), then a synthetic history written
fast through the instance's storages (``seed_history``: finished runs with the sensor's tags and
``--events-per-run`` events each, their terminal ``pending_executions`` rows and notifications),
then:

1. live latency: ``--live-n`` sequential executions (insert → COMPLETED), before the purge;
2. the purge of that whole history (``flux_dagster.purge.purge_history``, batches of 500) in a
   thread, while the same number of executions run, and its rate in runs/s and rows/s.

Results: ``bench/results/purge.json`` and a markdown table on stdout (docs/performance.md, "Purge").
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from bench.harness import REPO, Sampler, deployment
from bench.run import Bench, pct

# What a real execution's run carries (sensor tags) and roughly what its events look like.
RUN_TAGS = ("flux/pending_execution_id", "flux/exec_id", "flux/flow_id", "flux/node_id", "flux/user_id",
            "flux/node_type", "dagster/priority")


def seed_history(instance, app_url: str, runs: int, events_per_run: int) -> float:
    """Finished runs with tags and events, plus their rows; returns the seconds it took.

    Fast: runs, tags and (Postgres) events go in as multi-row inserts through the storages' own
    connections and row builders (``add_run`` and ``store_event`` open a connection per call,
    hours for 100,000 runs). On SQLite each run's events live in their own file: the first run's
    file is written through ``store_event``, the others are copies of it with their run id."""
    from dagster import DagsterRun, DagsterRunStatus
    from dagster._core.events.log import EventLogEntry
    from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.runs.schema import RunsTable, RunTagsTable

    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution, StatusNotification, utcnow

    run_storage, event_storage = instance.run_storage, instance.event_log_storage
    sqlite_events = isinstance(event_storage, SqliteEventLogStorage)
    template: str | None = None
    started = time.monotonic()
    batch = 1000
    for first in range(0, runs, batch):
        n = min(batch, runs - first)
        now = utcnow()
        with session_scope(app_url) as s:
            rows = [PendingExecution(kind="node", exec_id=str(uuid.uuid4()), flow_id=demo.DEMO_FLOW, node_id="summarize",
                                     user_id="history", status="completed", created_at=now, finished_at=now)
                    for _ in range(n)]
            s.add_all(rows)
            s.add_all(StatusNotification(room="room_user_history", exec_id=r.exec_id, status="COMPLETED",
                                         payload={}, created_at=now) for r in rows)
            s.flush()
            ids = [(r.id, r.exec_id) for r in rows]
        dagster_runs = [
            DagsterRun(job_name="process_single_node", run_id=str(uuid.uuid4()), status=DagsterRunStatus.SUCCESS,
                       tags=dict(zip(RUN_TAGS, (str(pending_id), exec_id, demo.DEMO_FLOW, "summarize", "history",
                                                "commandTextNode", "0"))))
            for pending_id, exec_id in ids
        ]
        with run_storage.connect() as conn:
            conn.execute(RunsTable.insert(), [run_storage._get_run_insertion_values(r, now) for r in dagster_runs])
            conn.execute(RunTagsTable.insert(), [dict(run_id=r.run_id, key=k, value=v)
                                                 for r in dagster_runs for k, v in r.tags.items()])
        entries = {r.run_id: [EventLogEntry(error_info=None, level=20, user_message=f"synthetic event {i}",
                                            run_id=r.run_id, timestamp=time.time(), step_key="text_generator",
                                            job_name="process_single_node", dagster_event=None)
                              for i in range(events_per_run)] for r in dagster_runs}
        if sqlite_events:
            for run_id, events in entries.items():
                if template is None:
                    for event in events:
                        event_storage.store_event(event)
                    template = event_storage.path_for_shard(run_id)
                    with sqlite3.connect(template) as db:
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    continue
                shard = event_storage.path_for_shard(run_id)
                shutil.copyfile(template, shard)
                with sqlite3.connect(shard) as db:
                    db.execute("PRAGMA synchronous = OFF")  # a bench fixture: no need to survive a crash
                    db.execute("UPDATE event_logs SET run_id = ?", (run_id,))
        elif events_per_run:
            with event_storage.index_connection() as conn:
                conn.execute(SqlEventLogStorageTable.insert(),
                             [event_storage._event_to_row(e) for events in entries.values() for e in events])
        print(f"  seeded {first + n}/{runs} runs ({time.monotonic() - started:.0f} s)", flush=True)
    return time.monotonic() - started


def latency(bench: Bench, n: int, rng: random.Random) -> dict:
    out = bench.sequential(n, 0.05, 0.5, rng)
    values = [s["to_completed"] for s in out["samples"]]
    return {"n": n, "failed_or_timed_out": out["failed_or_timed_out"], "p50_s": pct(values, 50),
            "p95_s": pct(values, 95), "max_s": max(values) if values else None}


def run_storage(storage: str, runs: int, events_per_run: int, live_n: int, seed: int) -> dict:
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import utcnow
    from flux_dagster.purge import count_purgeable, purge_history
    from flux_dagster_tests.fakes.llm import FakeLlm

    rng = random.Random(seed)
    with FakeLlm(latency_s=0.05) as llm:
        env_extra = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{llm.url}/v1"}
        with deployment("ours", storage, env_extra, use_pgbouncer=False) as dep:
            with session_scope(dep.app_url) as s:
                demo.seed(s)
            sampler = Sampler(dep.roots)
            try:
                bench = Bench(dep, llm, sampler, pg=storage == "postgres")
                # As `flux-dagster purge` does (run workers, where the job runs, are pooled already).
                bench.instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
                print(f"[{storage}] warming up", flush=True)
                bench.warm_up()
                print(f"[{storage}] seeding {runs} runs x {events_per_run} events", flush=True)
                seed_s = seed_history(bench.instance, dep.app_url, runs, events_per_run)
                cutoff = utcnow()
                with session_scope(dep.app_url) as s:
                    planned = count_purgeable(bench.instance, s, cutoff, redis_configured=False)
                print(f"[{storage}] live latency before the purge", flush=True)
                before = latency(bench, live_n, rng)

                result: dict = {}

                def purge() -> None:
                    t0 = time.monotonic()
                    done = purge_history(bench.instance, lambda: session_scope(dep.app_url), cutoff,
                                         redis_configured=False)
                    result.update(seconds=time.monotonic() - t0, runs=done.runs,
                                  rows=done.pending_executions + done.status_notifications)

                print(f"[{storage}] purging, live latency during the purge", flush=True)
                thread = threading.Thread(target=purge)
                thread.start()
                during = latency(bench, live_n, rng)
                still_purging = thread.is_alive()
                thread.join()
                return {
                    "storage": storage, "runs": runs, "events_per_run": events_per_run,
                    "seed_s": seed_s, "planned_runs": planned.runs, "purged_runs": result["runs"],
                    "purged_rows": result["rows"], "purge_s": result["seconds"],
                    "runs_per_s": result["runs"] / result["seconds"],
                    "latency_before": before, "latency_during": during,
                    "purge_outlasted_live_sample": still_purging,
                }
            finally:
                sampler.stop()


def markdown(results: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "| storage | runs × events | purge time | runs/s | rows deleted | live p50 / p95 before | during |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        b, d = r["latency_before"], r["latency_during"]
        lines.append(
            f"| {r['storage']} | {r['purged_runs']:,} × {r['events_per_run']} | {r['purge_s']:.0f} s | "
            f"{r['runs_per_s']:.0f} | {r['purged_rows']:,} | {b['p50_s']:.2f} / {b['p95_s']:.2f} s | "
            f"{d['p50_s']:.2f} / {d['p95_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--sqlite-runs", type=int, default=None,
                        help="runs for SQLite (default --runs)")
    parser.add_argument("--events-per-run", type=int, default=10)
    parser.add_argument("--storage", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    parser.add_argument("--live-n", type=int, default=30, help="sequential executions measured before and during")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    results = [run_storage(s, args.sqlite_runs or args.runs if s == "sqlite" else args.runs, args.events_per_run,
                           args.live_n, args.seed) for s in args.storage]
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "purge.json").write_text(json.dumps(results, indent=2, default=str))
    command = "python -m bench.purge " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(markdown(results, command.strip()))


if __name__ == "__main__":
    main()
