"""Purge rate on a synthetic history of 100,000 runs, and the latency a running deployment sees
during the purge (Postgres storage, as in production).

    .venv/bin/python -m bench.purge                     # 100,000 runs
    .venv/bin/python -m bench.purge --runs 5000 --live-min 5    # a quick look

A real code server + daemon (``bench/harness.py``) on fresh databases, one real execution (the
warm-up), then:

1. **seeding**: the warm-up's run copied ``--runs`` times in Postgres itself (``seed_history``):
   its ``runs`` row with a new run id, its tags, and its events except the run-lifecycle ones
   (``PIPELINE_*``: copied, they would feed 100,000 finished runs to the run-status sensors), each
   copy's run id written into the serialized run and events; and one terminal
   ``pending_executions`` row and one published ``status_notifications`` row per run in the app
   DB. Rows as Dagster wrote them, at ``INSERT … SELECT`` speed (``add_run``/``store_event`` per
   row would take hours);
2. **before**: ``--live-min`` sequential executions (insert → COMPLETED) and the storage reads of
   the UI's runs page (``get_runs(limit=25)`` + ``get_runs_count``);
3. **during**: ``flux-dagster purge --older-than-days D --yes`` as a subprocess, D putting the
   cutoff just after the history (the live executions are newer, so they stay), while
   executions and the same reads go on until it exits. The rate comes from the runs left,
   counted at every read.

Results: ``bench/results/purge.json`` and a markdown table on stdout (docs/performance.md, "Purge").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from bench.harness import BIN, REPO, Sampler, deployment
from bench.run import Bench, pct, ts

SEED_BATCH = 5000  # runs per transaction while seeding


def seed_history(bench: Bench, template_run_id: str, runs: int, events_per_run: int | None) -> dict:
    """``runs`` copies of the template run (see the module doc); returns counts and seconds."""
    from dagster._core.events import PIPELINE_EVENTS
    from sqlalchemy import bindparam, insert, inspect, select, text

    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution, StatusNotification

    lifecycle = sorted(e.value for e in PIPELINE_EVENTS)
    limit = "" if events_per_run is None else f"LIMIT {int(events_per_run)}"
    copy_run = text("""
        INSERT INTO runs (run_id, snapshot_id, pipeline_name, mode, status, run_body, partition, partition_set,
                          create_timestamp, update_timestamp, start_time, end_time, backfill_id)
        SELECT n.run_id, r.snapshot_id, r.pipeline_name, r.mode, r.status,
               replace(replace(r.run_body, :template, n.run_id), :template_exec, n.exec_id),
               r.partition, r.partition_set, r.create_timestamp, r.update_timestamp, r.start_time, r.end_time,
               r.backfill_id
        FROM runs r, unnest(CAST(:run_ids AS text[]), CAST(:exec_ids AS text[])) AS n(run_id, exec_id)
        WHERE r.run_id = :template""")
    copy_tags = text("""
        INSERT INTO run_tags (run_id, key, value)
        SELECT n.run_id, t.key, CASE t.key WHEN 'flux/pending_execution_id' THEN n.pending_id
                                           WHEN 'flux/exec_id' THEN n.exec_id ELSE t.value END
        FROM run_tags t,
             unnest(CAST(:run_ids AS text[]), CAST(:pending_ids AS text[]), CAST(:exec_ids AS text[]))
                 AS n(run_id, pending_id, exec_id)
        WHERE t.run_id = :template""")
    copy_events = text(f"""
        INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition)
        SELECT n.run_id, replace(e.event, :template, n.run_id), e.dagster_event_type, e.timestamp, e.step_key,
               e.asset_key, e.partition
        FROM unnest(CAST(:run_ids AS text[])) WITH ORDINALITY AS n(run_id, i),
             (SELECT * FROM event_logs WHERE run_id = :template
                AND coalesce(dagster_event_type, '') NOT IN :lifecycle ORDER BY id {limit}) AS e
        ORDER BY n.i, e.id""").bindparams(bindparam("lifecycle", value=lifecycle, expanding=True))

    with session_scope(bench.dep.app_url) as s:
        template_row = s.scalars(select(PendingExecution).where(
            PendingExecution.dagster_run_id == template_run_id)).one()
        template = {a.key: getattr(template_row, a.key) for a in inspect(PendingExecution).column_attrs
                    if a.key not in ("id", "exec_id", "user_id", "dagster_run_id")}
        template_exec = template_row.exec_id
    storage = bench.instance.run_storage
    started, events = time.monotonic(), 0
    for first in range(0, runs, SEED_BATCH):
        n = min(SEED_BATCH, runs - first)
        exec_ids = [str(uuid.uuid4()) for _ in range(n)]
        run_ids = [str(uuid.uuid4()) for _ in range(n)]
        with session_scope(bench.dep.app_url) as s:
            pending = s.execute(
                insert(PendingExecution).returning(PendingExecution.id, sort_by_parameter_order=True),
                [{**template, "exec_id": e, "user_id": "history", "dagster_run_id": r}
                 for e, r in zip(exec_ids, run_ids)]).scalars().all()
            s.execute(insert(StatusNotification),
                      [{"room": "room_user_history", "exec_id": e, "status": "COMPLETED", "payload": {},
                        "created_at": template["finished_at"], "published_at": template["finished_at"]}
                       for e in exec_ids])
        params = {"template": template_run_id, "template_exec": template_exec, "run_ids": run_ids,
                  "exec_ids": exec_ids, "pending_ids": [str(p) for p in pending]}
        with storage.connect() as conn:
            conn.execute(copy_run, params)
            conn.execute(copy_tags, params)
            events += conn.execute(copy_events, params).rowcount
        print(f"  seeded {first + n}/{runs} runs, {events} events ({time.monotonic() - started:.0f} s)", flush=True)
    # Planner statistics, as autovacuum keeps them on a production server (it is off on this
    # machine's): without them Postgres takes the history's tables for empty and plans the
    # purge's deletes by run id as scans of the whole event log (minutes per batch).
    with storage.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    with session_scope(bench.dep.app_url) as s:
        s.execute(text("ANALYZE"))
    return {"runs": runs, "events": events, "seconds": time.monotonic() - started}


class Reads:
    """What the UI's runs page asks the storage (the 25 newest runs and the count), timed, in a
    thread, once a second; the count of runs older than the cutoff gives the purge's progress."""

    def __init__(self, instance, cutoff: datetime):
        from dagster import RunsFilter

        self.instance, self.old = instance, RunsFilter(updated_before=cutoff)
        self.samples: list[tuple[float, float, int]] = []  # (monotonic, seconds, old runs left)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from dagster import RunsFilter

        while not self._stop.is_set():
            t0 = time.monotonic()
            self.instance.get_runs(limit=25)
            self.instance.get_runs_count(RunsFilter())
            elapsed = time.monotonic() - t0
            self.samples.append((t0, elapsed, self.instance.get_runs_count(self.old)))
            self._stop.wait(max(0.0, 1.0 - elapsed))

    def take(self) -> list[tuple[float, float, int]]:
        taken, self.samples = self.samples, []
        return taken

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": pct(values, 50), "p95_s": pct(values, 95),
            "max_s": max(values) if values else None}


def live(bench: Bench, rng: random.Random, go_on: Callable[[int], bool]) -> tuple[list[float], int]:
    """Sequential executions (a random gap of up to 2 s before each) while ``go_on(done)``;
    returns their insert → COMPLETED latencies (the row's own timestamps) and how many failed
    or did not finish within 120 s."""
    bench.llm.latency_s = 0.05
    latencies, failed, done = [], 0, 0
    while go_on(done):
        time.sleep(rng.uniform(0, 2.0))
        ids = bench.insert(1)
        bench.wait(ids, 120, 0.05)
        row = bench.rows(ids)[ids[0]]
        if row.status == "completed":
            latencies.append(ts(row.finished_at) - ts(row.created_at))
        else:
            failed += 1
        done += 1
    return latencies, failed


def run(runs: int, events_per_run: int | None, live_min: int, seed: int) -> dict:
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    from flux_dagster.db.models import PendingExecution
    from flux_dagster_tests.fakes.llm import FakeLlm

    rng = random.Random(seed)
    with FakeLlm(latency_s=0.05) as llm:
        env_extra = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{llm.url}/v1"}
        with deployment("ours", "postgres", env_extra, use_pgbouncer=False) as dep:
            with session_scope(dep.app_url) as s:
                demo.seed(s)
            sampler = Sampler(dep.roots)
            try:
                bench = Bench(dep, llm, sampler, pg=True)
                bench.instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
                print("warming up (the template run)", flush=True)
                bench.warm_up()
                with session_scope(dep.app_url) as s:
                    row = s.query(PendingExecution).filter(PendingExecution.status == "completed").one()
                    template_run_id, cutoff = row.dagster_run_id, row.finished_at
                cutoff = (cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=timezone.utc))
                template_run = bench.instance.get_run_record_by_id(template_run_id)
                # Just after the history (every copy carries the template's timestamps).
                cutoff = max(cutoff, template_run.update_timestamp.replace(tzinfo=timezone.utc)) + timedelta(seconds=1)
                print(f"seeding {runs} copies of run {template_run_id}", flush=True)
                seeded = seed_history(bench, template_run_id, runs, events_per_run)
                with bench.instance.run_storage.connect() as conn:
                    db_bytes = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()

                reads = Reads(bench.instance, cutoff)
                print("live latency before the purge", flush=True)
                before, failed_before = live(bench, rng, lambda done: done < live_min)
                reads_before = reads.take()

                # The CLI computes its cutoff when it starts, a little after this one: still before
                # the live executions, which all started after the seeding.
                days = (datetime.now(timezone.utc) - cutoff).total_seconds() / 86400
                print(f"purging: flux-dagster purge --older-than-days {days:.6f} --yes", flush=True)
                log = dep.workdir / "purge.log"
                t0 = time.monotonic()
                with open(log, "w") as out:
                    purge = subprocess.Popen([BIN / "flux-dagster", "purge", "--older-than-days", f"{days:.8f}",
                                              "--yes"], env=dep.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
                    during, failed_during = live(bench, rng, lambda done: purge.poll() is None)
                    purge.wait()
                purge_s = time.monotonic() - t0
                reads_during = reads.take()
                reads.stop()
                output = log.read_text()
                assert purge.returncode == 0, output[-3000:]
                # The runs phase: from the CLI's start to the first read seeing no old run left
                # (reads are a second apart); the first read seeing runs gone tells the CLI's own start.
                first = next((t for t, _, left in reads_during if left < runs + 1), t0)
                last = next((t for t, _, left in reads_during if left == 0), t0 + purge_s)
                return {
                    "runs": runs, "events": seeded["events"], "events_per_run": seeded["events"] / runs,
                    "seed_s": seeded["seconds"], "db_bytes_seeded": db_bytes,
                    "purge_output": output.strip().splitlines()[-1], "purge_s": purge_s,
                    "cli_start_s": first - t0, "runs_phase_s": last - t0, "runs_per_s": runs / (last - t0),
                    "runs_left": bench.instance.get_runs_count(reads.old),
                    "live_before": {**summary(before), "failed": failed_before},
                    "live_during": {**summary(during), "failed": failed_during},
                    "reads_before": summary([s for _, s, _ in reads_before]),
                    "reads_during": summary([s for _, s, _ in reads_during]),
                    "progress": [(round(t - t0, 1), n) for t, _, n in reads_during][::10],
                }
            finally:
                sampler.stop()


def markdown(r: dict, command: str) -> str:
    def lat(s: dict) -> str:
        return f"{s['p50_s']:.2f} / {s['p95_s']:.2f} / {s['max_s']:.2f} s ({s['n']})"

    return "\n".join([
        f"`{command}`", "",
        "| figure | value |", "|---|---|",
        f"| history | {r['runs']:,} runs, {r['events']:,} events ({r['events_per_run']:.0f} per run), "
        f"{r['db_bytes_seeded'] / 2**30:.1f} GiB Dagster DB; seeded in {r['seed_s']:.0f} s |",
        f"| purge, runs phase (incl. the CLI's start, ~{r['cli_start_s']:.0f} s) | {r['runs_phase_s']:.0f} s: "
        f"**{r['runs_per_s']:.0f} runs/s** |",
        f"| purge, whole command (runs, then 2 × {r['runs']:,} app rows) | {r['purge_s']:.0f} s: {r['purge_output']} |",
        f"| live insert → COMPLETED before, p50 / p95 / max (n) | {lat(r['live_before'])} |",
        f"| same, during the purge | {lat(r['live_during'])} |",
        f"| runs-page storage reads before, p50 / p95 / max (n) | {lat(r['reads_before'])} |",
        f"| same, during the purge | {lat(r['reads_during'])} |",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--events-per-run", type=int, default=None,
                        help="copy only the template's first N events (default: all but the run-lifecycle ones)")
    parser.add_argument("--live-min", type=int, default=20, help="sequential executions measured before the purge")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    result = run(args.runs, args.events_per_run, args.live_min, args.seed)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "purge.json").write_text(json.dumps(result, indent=2, default=str))
    command = "python -m bench.purge " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(result, command.strip()))


if __name__ == "__main__":
    main()
