"""Throughput and latency of flux-dagster against a stock Dagster set-up of the same job.

For each storage (SQLite, Postgres) and each configuration — ``stock`` (bench/stock_dagster.yaml:
DefaultRunLauncher, the sensor on Dagster's plain cadence) and ``ours`` (dagster.yaml: warm run
launcher, long-polling sensor shards, pgbouncer on Postgres) — it starts a real code server and
dagster-daemon, queues commandTextNode executions through ``pending_executions`` against a
loopback OpenAI-compatible server, and measures:

- sequential executions inserted at random moments (LLM latency 50 ms, then 2 s):
  insert → run start and insert → COMPLETED, p50/p95, and where the time goes (phases);
- bursts of 100 and 1,000 rows inserted at once: throughput, CPU seconds per execution over
  every process of the deployment (and, on Postgres, the server's own CPU, machine-wide);
- peak RSS per process kind, private memory (USS) per run worker, idle CPU.

    .venv/bin/python -m bench.run [--storage sqlite|postgres|both] [--modes stock,ours] [--quick]

Writes bench/results/<timestamp>.json and .md. Every wait is bounded; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.harness import (
    REPO, Sampler, deployment, execution_rows, insert_executions, postgres_roots, tree_cpu, tree_cpu_by_kind,
)

TERMINAL = ("completed", "failed", "cancelled")
NODE_ID = "summarize"  # demo commandTextNode on openai gpt-4o-mini


@dataclass(frozen=True)
class Plan:
    seq_fast: int
    seq_slow: int
    gap_max_s: float  # random wait before each sequential insert: most of a sensor loop (5 s)
    bursts: tuple[tuple[int, float], ...]  # (rows, time bound in seconds)
    idle_s: float


FULL = Plan(seq_fast=8, seq_slow=3, gap_max_s=4.0, bursts=((100, 90.0), (1000, 60.0)), idle_s=5.0)
QUICK = Plan(seq_fast=4, seq_slow=2, gap_max_s=4.0, bursts=((100, 90.0),), idle_s=0.0)


def ts(value) -> float:
    """A row timestamp as epoch seconds (SQLite returns naive UTC datetimes)."""
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, dep, llm, sampler: Sampler, pg: bool):
        self.dep, self.llm, self.sampler, self.pg = dep, llm, sampler, pg
        from dagster import DagsterInstance

        os.environ.update({k: v for k, v in dep.env.items() if k in ("DAGSTER_HOME", "DAGSTER_PG_URL")})
        if "DAGSTER_PG_URL" not in dep.env:
            os.environ.pop("DAGSTER_PG_URL", None)
        self.instance = DagsterInstance.get()
        self.postgres = postgres_roots() if pg else []

    def insert(self, n: int) -> list[int]:
        return insert_executions(self.dep.app_url, n, NODE_ID)

    def rows(self, ids: list[int]):
        return execution_rows(self.dep.app_url, ids)

    def count_terminal(self, ids: list[int]) -> int:
        from sqlalchemy import func, select

        from flux_dagster.db.engine import session_scope
        from flux_dagster.db.models import PendingExecution

        with session_scope(self.dep.app_url) as s:
            return s.scalar(select(func.count()).where(PendingExecution.id.in_(ids), PendingExecution.status.in_(TERMINAL)))

    def wait(self, ids: list[int], timeout_s: float, poll_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count_terminal(ids) == len(ids):
                return True
            time.sleep(poll_s)
        return False

    def cpu(self) -> tuple[float, float]:
        return tree_cpu(self.dep.roots), tree_cpu(self.postgres) if self.postgres else 0.0

    def phases(self, row) -> dict[str, float] | None:
        """Where one execution's time went, from the row's and the run's timestamps."""
        from dagster._core.events import DagsterEventType

        if not row.dagster_run_id or row.status != "completed":
            return None
        marks: dict[str, float] = {}
        for entry in self.instance.all_logs(row.dagster_run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.RUN_ENQUEUED:
                marks.setdefault("enqueued", entry.timestamp)
            elif event.event_type == DagsterEventType.RUN_STARTING:
                marks.setdefault("starting", entry.timestamp)
            elif event.event_type == DagsterEventType.ENGINE_EVENT and (entry.message or "").startswith("Started process"):
                marks.setdefault("process", entry.timestamp)
            elif event.event_type == DagsterEventType.RUN_START:
                marks.setdefault("run_start", entry.timestamp)
        # A run launched at once by the prompt coordinator is never queued: no RUN_ENQUEUED.
        marks.setdefault("enqueued", marks.get("starting"))
        if len(marks) < 4 or None in marks.values():
            return None
        inserted = ts(row.created_at)
        return {
            "sensor_wait": ts(row.launched_at) - inserted,
            "submit": marks["enqueued"] - ts(row.launched_at),
            "queue": marks["starting"] - marks["enqueued"],
            "launch": marks["process"] - marks["starting"],
            "import_load": marks["run_start"] - marks["process"],
            "ops": ts(row.finished_at) - marks["run_start"],
            "to_run_start": marks["run_start"] - inserted,
            "to_completed": ts(row.finished_at) - inserted,
        }

    def warm_up(self) -> None:
        ids = self.insert(1)
        if not self.wait(ids, 180, 0.2):
            raise RuntimeError(f"warm-up execution did not finish; see {self.dep.log}")

    def idle(self, seconds: float) -> dict:
        cpu0, _ = self.cpu()
        time.sleep(seconds)
        cpu1, _ = self.cpu()
        return {"cpu_s_per_min": (cpu1 - cpu0) / seconds * 60}

    def sequential(self, n: int, latency_s: float, gap_max_s: float, rng: random.Random) -> dict:
        self.llm.latency_s = latency_s
        samples, failures = [], 0
        cpu0, pg0 = self.cpu()
        for _ in range(n):
            time.sleep(rng.uniform(0, gap_max_s))
            ids = self.insert(1)
            self.wait(ids, 60 + latency_s, 0.05)
            row = self.rows(ids)[ids[0]]
            phases = self.phases(row)
            if phases is None:
                failures += 1
            else:
                samples.append(phases)
        cpu1, pg1 = self.cpu()
        out = {"n": n, "failed_or_timed_out": failures, "samples": samples,
               "cpu_s_per_execution_incl_idle": (cpu1 - cpu0) / n}
        for key in ("to_run_start", "to_completed", "sensor_wait", "submit", "queue", "launch", "import_load", "ops"):
            values = [s[key] for s in samples]
            out[key] = {"p50": pct(values, 50), "p95": pct(values, 95), "mean": statistics.fmean(values) if values else None}
        return out

    def stop_burst(self, ids: list[int]) -> None:
        """At the time bound: rows not yet launched are cancelled, queued runs are canceled, and the
        runs in flight are left to finish (bounded), so that CPU per execution counts whole runs."""
        from dagster import DagsterRunStatus, RunsFilter
        from sqlalchemy import update

        from flux_dagster.db.engine import session_scope
        from flux_dagster.db.models import PendingExecution

        with session_scope(self.dep.app_url) as s:
            s.execute(update(PendingExecution).where(PendingExecution.id.in_(ids), PendingExecution.status == "pending")
                      .values(status="cancelled", error="bench: time bound"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # The sensor may still be turning rows it claimed into runs: cancel until none is queued.
            queued = self.instance.get_run_ids(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
            for run_id in queued:
                self.instance.run_coordinator.cancel_run(run_id)
            in_flight = self.instance.get_run_ids(RunsFilter(statuses=[
                DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
                DagsterRunStatus.CANCELING]))
            if not queued and not in_flight:
                return
            time.sleep(0.5)

    def burst(self, n: int, bound_s: float) -> dict:
        self.llm.latency_s = 0.05
        self.sampler.reset()
        cpu0, pg0 = self.cpu()
        kinds0 = tree_cpu_by_kind(self.dep.roots)
        inserted = time.time()
        ids = self.insert(n)
        done_all = self.wait(ids, bound_s, 0.5)
        # Figures over the burst itself: at the time bound, what finished by then and the CPU used
        # until then (the few runs in flight at that moment are counted in CPU, not in executions).
        cpu1, pg1 = self.cpu()
        kinds1 = tree_cpu_by_kind(self.dep.roots)
        if not done_all:
            self.stop_burst(ids)
        rows = self.rows(ids).values()
        completed = [r for r in rows if r.status == "completed" and (done_all or ts(r.finished_at) <= inserted + bound_s)]
        window = (max(ts(r.finished_at) for r in completed) - inserted if done_all else bound_s) if completed else None
        done = max(1, len(completed))
        uss = self.sampler.worker_uss
        return {
            "n": n, "time_bound_s": bound_s, "finished_within_bound": done_all, "completed": len(completed),
            "window_s": window,
            "throughput_per_min": len(completed) / window * 60 if window else None,
            "cpu_s_per_execution": (cpu1 - cpu0) / done,
            "postgres_server_cpu_s_per_execution": (pg1 - pg0) / done if self.pg else None,
            "cpu_s_per_execution_by_kind": {k: (kinds1[k] - kinds0.get(k, 0.0)) / done for k in kinds1},
            "peak_run_workers_uss_mb": self.sampler.peak_workers_uss,
            "peak_rss_mb": dict(self.sampler.peak_rss), "peak_total_rss_mb": dict(self.sampler.peak_total_rss),
            "peak_concurrent_run_workers": self.sampler.peak_workers,
            "run_worker_uss_mb_p50": pct(uss, 50), "run_worker_uss_mb_max": max(uss) if uss else None,
        }


def run_configuration(storage: str, mode: str, plan: Plan, seed: int, use_pgbouncer: bool) -> dict:
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    from flux_dagster_tests.fakes.llm import FakeLlm

    rng = random.Random(seed)
    started = time.monotonic()
    with FakeLlm(latency_s=0.05) as llm:
        env_extra = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{llm.url}/v1"}
        with deployment(mode, storage, env_extra, use_pgbouncer=use_pgbouncer and mode == "ours") as dep:
            with session_scope(dep.app_url) as s:
                demo.seed(s)
            sampler = Sampler(dep.roots)
            try:
                bench = Bench(dep, llm, sampler, pg=storage == "postgres")
                print(f"[{storage}/{mode}] warming up", flush=True)
                bench.warm_up()
                result: dict = {"storage": storage, "mode": mode,
                                "pgbouncer": use_pgbouncer and mode == "ours" and storage == "postgres"}
                if plan.idle_s:
                    result["idle"] = bench.idle(plan.idle_s)
                sampler.reset()
                print(f"[{storage}/{mode}] sequential, 50 ms LLM", flush=True)
                result["sequential_50ms"] = bench.sequential(plan.seq_fast, 0.05, plan.gap_max_s, rng)
                print(f"[{storage}/{mode}] sequential, 2 s LLM", flush=True)
                result["sequential_2s"] = bench.sequential(plan.seq_slow, 2.0, plan.gap_max_s, rng)
                result["sequential_peak_rss_mb"] = dict(sampler.peak_rss)
                for n, bound in plan.bursts:
                    print(f"[{storage}/{mode}] burst of {n} (bound {bound:.0f} s)", flush=True)
                    result[f"burst_{n}"] = bench.burst(n, bound)
                result["wall_s"] = time.monotonic() - started
                return result
            finally:
                sampler.stop()
                shutil.copyfile(dep.log, REPO / "bench" / "results" / f"deployment-{storage}-{mode}.log")


# --- report ------------------------------------------------------------------------------------


def _get(result: dict, path: str):
    value = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


FIGURES = [
    ("insert → run start, p50 (50 ms LLM)", "sequential_50ms.to_run_start.p50", "s"),
    ("insert → run start, p95 (50 ms LLM)", "sequential_50ms.to_run_start.p95", "s"),
    ("insert → COMPLETED, p50 (50 ms LLM)", "sequential_50ms.to_completed.p50", "s"),
    ("insert → COMPLETED, p95 (50 ms LLM)", "sequential_50ms.to_completed.p95", "s"),
    ("insert → COMPLETED, p50 (2 s LLM)", "sequential_2s.to_completed.p50", "s"),
    ("insert → COMPLETED, p95 (2 s LLM)", "sequential_2s.to_completed.p95", "s"),
    ("phase: sensor wait, p50", "sequential_50ms.sensor_wait.p50", "s"),
    ("phase: sensor tick → run queued, p50", "sequential_50ms.submit.p50", "s"),
    ("phase: run queue, p50", "sequential_50ms.queue.p50", "s"),
    ("phase: launch (process start), p50", "sequential_50ms.launch.p50", "s"),
    ("phase: import + load code, p50", "sequential_50ms.import_load.p50", "s"),
    ("phase: ops (run start → COMPLETED), p50", "sequential_50ms.ops.p50", "s"),
    ("burst of 100: executions/min", "burst_100.throughput_per_min", "/min"),
    ("burst of 1,000: executions/min", "burst_1000.throughput_per_min", "/min"),
    ("burst of 1,000: completed within the time bound", "burst_1000.completed", ""),
    ("burst of 1,000: time bound", "burst_1000.time_bound_s", "s"),
    ("CPU-s per execution, deployment processes (burst of 100)", "burst_100.cpu_s_per_execution", "s"),
    ("CPU-s per execution, Postgres server (burst of 100, machine-wide)", "burst_100.postgres_server_cpu_s_per_execution", "s"),
    ("… of which run workers", "burst_100.cpu_s_per_execution_by_kind.run worker", "s"),
    ("… of which daemon", "burst_100.cpu_s_per_execution_by_kind.daemon", "s"),
    ("… of which code server", "burst_100.cpu_s_per_execution_by_kind.code server", "s"),
    ("… of which zygote (launches)", "burst_100.cpu_s_per_execution_by_kind.zygote", "s"),
    ("CPU-s per execution, deployment processes (burst of 1,000)", "burst_1000.cpu_s_per_execution", "s"),
    ("idle CPU, CPU-s per minute", "idle.cpu_s_per_min", "s"),
    ("peak RSS, daemon", "burst_100.peak_rss_mb.daemon", "MB"),
    ("peak RSS, code server (largest process)", "burst_100.peak_rss_mb.code server", "MB"),
    ("peak RSS, zygote", "burst_100.peak_rss_mb.zygote", "MB"),
    ("peak RSS, one run worker", "burst_100.peak_rss_mb.run worker", "MB"),
    ("run worker private memory (USS), p50", "burst_100.run_worker_uss_mb_p50", "MB"),
    ("peak concurrent run workers (burst of 100)", "burst_100.peak_concurrent_run_workers", ""),
    ("peak private memory (USS), all run workers together", "burst_100.peak_run_workers_uss_mb", "MB"),
    ("peak RSS, pgbouncer", "burst_100.peak_rss_mb.pgbouncer", "MB"),
]


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    if unit == "/min":
        return f"{value:.0f}/min"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.0f}" if isinstance(value, (int, float)) else str(value)


def markdown(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for storage in dict.fromkeys(r["storage"] for r in results):
        by_mode = {r["mode"]: r for r in results if r["storage"] == storage}
        stock, ours = by_mode.get("stock", {}), by_mode.get("ours", {})
        bouncer = " + pgbouncer" if ours.get("pgbouncer") else ""
        lines += [f"### {storage}", "", f"| figure | stock | ours{bouncer} | ours ÷ stock |", "|---|---|---|---|"]
        for label, path, unit in FIGURES:
            a, b = _get(stock, path), _get(ours, path)
            if a is None and b is None:
                continue
            ratio = f"×{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "—"
            lines.append(f"| {label} | {_fmt(a, unit)} | {_fmt(b, unit)} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", choices=["sqlite", "postgres", "both"], default=None,
                        help="default: both (sqlite with --quick)")
    parser.add_argument("--modes", default="stock,ours", help="comma-separated: stock, ours")
    parser.add_argument("--quick", action="store_true", help="fewer samples, no burst of 1,000 (a few minutes)")
    parser.add_argument("--no-pgbouncer", action="store_true", help="ours on Postgres without pgbouncer")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    storage = args.storage or ("sqlite" if args.quick else "both")
    storages = ["sqlite", "postgres"] if storage == "both" else [storage]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    plan = QUICK if args.quick else FULL
    use_pgbouncer = not args.no_pgbouncer and bool(shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists())
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = [run_configuration(s, m, plan, args.seed, use_pgbouncer) for s in storages for m in modes]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"command": command.strip(), "plan": plan.__dict__, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    (out_dir / f"{stamp}.json").write_text(json.dumps({**meta, "results": results}, indent=2, default=str))
    table = markdown(results, command.strip())
    (out_dir / f"{stamp}.md").write_text(table)
    print(table)
    print(f"written: bench/results/{stamp}.json and .md")


if __name__ == "__main__":
    main()
