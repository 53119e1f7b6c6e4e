"""flux-dagster side by side with a Temporal worker doing the same work (issue 12's table).

    .venv/bin/python -m bench.peer [--quick] [--no-peer]      (make bench-peer)

Both run the demo ``summarize`` node (commandTextNode, openai SDK) against the loopback
OpenAI-compatible server (``flux_dagster_tests/fakes/llm.py``) with the app DB on the machine's
Postgres, in one sitting:

- **ours**: dagster.yaml as committed (warm run hosts, Postgres storage), a real code server and
  ``dagster-daemon`` (``bench/harness.py``), pgbouncer in transaction mode in front of Postgres (as
  docs/production.md recommends); executions queued by inserting ``pending_executions`` rows, as
  the main API does;
- **peer**: ``bench/temporal_peer.py`` — ``temporal server start-dev`` and one temporalio worker
  whose workflow calls the same plain functions as one activity per op. It needs the ``temporal``
  CLI (on PATH or ``FLUX_TEMPORAL_CLI``); where there is none (this project's build machines
  cannot download it) the table shows the peer figures recorded on this machine class in
  ``bench/peer_reference.json``, marked as such.

Figures: CPU-s per execution over every process of the deployment plus the Postgres backends
serving its databases (not the rest of a shared server) (bursts of 200 at 50 ms, 2 s and 10 s LLM latency); time to drain each burst; peak executions in
flight; peak Postgres server connections (``pg_stat_activity``); peak memory (sum of PSS) and
the extra memory per execution in flight (a last burst with a 60 s LLM, so that all of it is in
flight at once); sequential insert → COMPLETED p50 at low load.
Results go to ``bench/results/peer-<time>.json`` and ``.md`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from datetime import datetime, timezone

from bench.harness import (
    REPO, deployment, execution_rows, in_flight_llm, insert_executions, postgres_backend_cpu, tree_cpu, tree_cpu_by_kind, tree_pss_mb,
)

TERMINAL = ("completed", "failed", "cancelled")
LATENCIES = {"50ms": 0.05, "2s": 2.0, "10s": 10.0}
IN_FLIGHT_LATENCY_S = 60.0


def _ts(value) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def _p50(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


class PeakSampler:
    """Every 0.5 s: rows ``running``, Postgres server connections to the
    deployment's databases, and the sum of PSS over the deployment's processes."""

    def __init__(self, roots, app_url: str, databases: list[str]):
        from sqlalchemy import create_engine

        from flux_dagster.db.engine import normalize_url

        self.roots, self.app_url, self.databases = roots, app_url, databases
        self._admin = create_engine(normalize_url("postgresql://postgres@127.0.0.1:5432/postgres"),
                                    isolation_level="AUTOCOMMIT", pool_size=1)
        self.in_flight = self.connections = 0
        self.pss_mb = 0.0
        self._backend_cpu: dict[int, float] = {}  # Postgres backends serving the deployment's databases
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pss_now(self) -> float:
        return tree_pss_mb(self.roots)

    def postgres_cpu(self) -> float:
        """CPU-s of the Postgres backends serving the deployment's databases, live or gone (their
        last reading): the server's work for this deployment only, whatever else uses it."""
        return postgres_backend_cpu(self.databases, self._backend_cpu)

    def _run(self) -> None:
        from sqlalchemy import func, select, text

        from flux_dagster.db.engine import session_scope
        from flux_dagster.db.models import PendingExecution

        while not self._stop.wait(0.5):
            try:
                with session_scope(self.app_url) as s:
                    running = s.scalar(select(func.count()).where(PendingExecution.status == "running"))
                with self._admin.connect() as conn:
                    connections = conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(:names)"), {"names": self.databases}
                    ).scalar()
            except Exception:  # noqa: BLE001 - a missed sample only
                continue
            self.in_flight = max(self.in_flight, running)
            self.connections = max(self.connections, connections - 1)  # not the sampler's own app-DB session
            self.pss_mb = max(self.pss_mb, self.pss_now())
            self.postgres_cpu()

    def reset(self) -> None:
        self.in_flight = self.connections = 0
        self.pss_mb = 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Ours:
    def __init__(self, dep, llm):
        self.dep, self.llm = dep, llm

    def insert(self, n: int) -> list[int]:
        return insert_executions(self.dep.app_url, n)

    def rows(self, ids: list[int]) -> list:
        return list(execution_rows(self.dep.app_url, ids).values())

    def wait(self, ids: list[int], timeout_s: float, poll_s: float = 0.2) -> list:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.rows(ids)
            if all(r.status in TERMINAL for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(poll_s)

    def cpu(self) -> float:
        return tree_cpu(self.dep.roots)


def measure_ours(quick: bool) -> dict:
    from flux_dagster import demo
    from flux_dagster.db.engine import session_scope
    burst = 50 if quick else 200
    out: dict = {"cpu_s_per_execution": {}, "cpu_s_per_execution_by_kind": {}, "drain_s": {}, "completed": {},
                 "burst": burst}
    with in_flight_llm(latency_s=0.05) as llm:
        env_extra = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{llm.url}/v1"}
        # pgbouncer in transaction mode in front of Postgres, as docs/production.md recommends for
        # the daemon, code server and run hosts.
        with deployment("ours", "postgres", env_extra, use_pgbouncer=True, pgbouncer_mode="transaction",
                        pgbouncer_pool_size=20) as dep:
            with session_scope(dep.app_url) as s:
                demo.seed(s)
            ours = Ours(dep, llm)
            databases = [dep.env["DAGSTER_PG_URL"].rsplit("/", 1)[1], dep.app_url.rsplit("/", 1)[1]]
            sampler = PeakSampler(dep.roots, dep.app_url, databases)
            try:
                print("[ours] warming up", flush=True)
                ours.wait(ours.insert(2), 180)
                print("[ours] sequential, 50 ms LLM", flush=True)
                rng, completed = random.Random(12), []
                for _ in range(5 if quick else 12):
                    time.sleep(rng.uniform(0.5, 2.0))
                    (row,) = ours.wait(ours.insert(1), 60, poll_s=0.02)
                    if row.status == "completed":
                        completed.append(row)
                out["sequential_p50_s"] = _p50([_ts(r.finished_at) - _ts(r.created_at) for r in completed])
                out["sequential_completed"] = len(completed)
                out["sequential_phases_p50_s"] = sequential_phases(dep.env["DAGSTER_PG_URL"], completed)
                time.sleep(3)
                idle_pss = sampler.pss_now()
                sampler.reset()
                for name, latency in LATENCIES.items():
                    llm.latency_s = latency
                    print(f"[ours] burst of {burst}, {name} LLM", flush=True)
                    cpu0, started = ours.cpu(), time.time()
                    kinds0, pg0 = tree_cpu_by_kind(dep.roots), sampler.postgres_cpu()
                    rows = ours.wait(ours.insert(burst), 900, poll_s=0.5)
                    cpu1 = ours.cpu()
                    kinds1, pg1 = tree_cpu_by_kind(dep.roots), sampler.postgres_cpu()
                    done = [r for r in rows if r.status == "completed"]
                    out["completed"][name] = len(done)
                    n_done = max(1, len(done))
                    out["cpu_s_per_execution"][name] = (cpu1 - cpu0 + pg1 - pg0) / n_done
                    out["cpu_s_per_execution_by_kind"][name] = {
                        **{k: round((kinds1[k] - kinds0.get(k, 0.0)) / n_done, 3) for k in kinds1},
                        "postgres backends": round((pg1 - pg0) / n_done, 3)}
                    out["drain_s"][name] = max(_ts(r.finished_at) for r in done) - started if done else None
                    time.sleep(2)
                # Capacity: how many executions this machine holds in flight at once. An LLM that
                # answers after a minute, so that every execution of the burst is started before the
                # first one ends (starting one costs CPU; 2 cores start a few per second).
                llm.latency_s, llm.peak_open = IN_FLIGHT_LATENCY_S, 0
                sampler.reset()
                print(f"[ours] burst of {burst}, {IN_FLIGHT_LATENCY_S:.0f} s LLM (in flight)", flush=True)
                rows = ours.wait(ours.insert(burst), 900, poll_s=0.5)
                out["completed"]["in_flight"] = sum(r.status == "completed" for r in rows)
                out["peak_in_flight"] = llm.peak_open  # LLM requests open at once, as for the peer
                out["peak_running_rows"] = sampler.in_flight
                out["peak_pg_connections"] = sampler.connections
                out["peak_pss_mb"] = sampler.pss_mb
                out["idle_pss_mb"] = idle_pss
                out["extra_pss_per_in_flight_mb"] = (sampler.pss_mb - idle_pss) / max(1, llm.peak_open)
            finally:
                sampler.stop()
    return out


def sequential_phases(dagster_url: str, rows: list) -> dict:
    """Where an execution's insert → completed time goes, p50 of each phase: the row claimed by
    the sensor, its run created by the daemon, the run started in a run host, the node's first op,
    the node done (COMPLETED)."""
    from sqlalchemy import create_engine, text

    from flux_dagster.db.engine import normalize_url

    engine = create_engine(normalize_url(dagster_url), poolclass=None)
    with engine.connect() as conn:
        runs = {r.run_id: r for r in conn.execute(
            text("select run_id, create_timestamp, start_time from runs where run_id = any(:ids)"),
            {"ids": [r.dagster_run_id for r in rows]})}
    engine.dispose()
    phases: dict[str, list[float]] = {"insert → claimed": [], "claimed → run created": [],
                                      "run created → run started": [], "run started → first op": [],
                                      "first op → completed": []}
    for row in rows:
        run = runs.get(row.dagster_run_id)
        if run is None or run.start_time is None:
            continue
        marks = [_ts(row.created_at), _ts(row.launched_at), _ts(run.create_timestamp), run.start_time,
                 _ts(row.started_at), _ts(row.finished_at)]
        for name, (a, b) in zip(phases, zip(marks, marks[1:])):
            phases[name].append(b - a)
    return {name: round(_p50(values), 3) if values else None for name, values in phases.items()}


def measure_peer(quick: bool) -> tuple[dict, str]:
    """The peer measured now, else the recorded reference figures."""
    try:
        from bench.temporal_peer import PeerUnavailable, run_peer
    except ImportError as exc:  # temporalio missing (the bench extra)
        reason = f"bench.temporal_peer not importable ({exc})"
    else:
        try:
            return run_peer(quick=quick), "measured in this sitting"
        except PeerUnavailable as exc:
            reason = str(exc)
    reference = _reference()
    return reference, f"recorded: {reference.get('source', 'none')} (not run now: {reason})"


def _reference() -> dict:
    path = REPO / "bench" / "peer_reference.json"
    return json.loads(path.read_text()) if path.exists() else {}


ROWS = [
    ("CPU-s per execution, deployment + its Postgres (burst, 50 ms LLM)", "cpu_s_per_execution.50ms", "{:.2f}"),
    ("CPU-s per execution (burst, 2 s LLM)", "cpu_s_per_execution.2s", "{:.2f}"),
    ("CPU-s per execution (burst, 10 s LLM)", "cpu_s_per_execution.10s", "{:.2f}"),
    ("burst, LLM after 2 s: time to drain (s)", "drain_s.2s", "{:.0f}"),
    ("burst, LLM after 10 s: time to drain (s)", "drain_s.10s", "{:.0f}"),
    ("executions in flight at once (peak)", "peak_in_flight", "{:.0f}"),
    ("Postgres server connections (peak)", "peak_pg_connections", "{:.0f}"),
    ("sequential insert → completed p50 (s)", "sequential_p50_s", "{:.2f}"),
    ("memory at the peak of a burst, sum of PSS (MB)", "peak_pss_mb", "{:.0f}"),
    ("extra memory per execution in flight (MB)", "extra_pss_per_in_flight_mb", "{:.1f}"),
]


def _get(data: dict, path: str):
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):  # a recorded range
        return "–".join(spec.format(v) for v in value)
    return spec.format(value)


def _ratio(ours, peer) -> str:
    if ours is None or peer is None:
        return "—"
    if isinstance(peer, list):
        return f"×{ours / peer[1]:.1f}–{ours / peer[0]:.1f}" if peer[0] else "—"
    return f"×{ours / peer:.2f}" if peer else "—"


def table(ours: dict, peer: dict, peer_note: str) -> str:
    lines = [f"Bursts of {ours['burst']}; flux-dagster's in-flight, connection and memory peaks are from its burst "
             f"with a {IN_FLIGHT_LATENCY_S:.0f} s LLM. Peer: {peer_note}.", "",
             "| figure | Temporal peer | flux-dagster | ratio |", "|---|---|---|---|"]
    for label, path, spec in ROWS:
        o, p = _get(ours, path), _get(peer, path)
        lines.append(f"| {label} | {_fmt(p, spec)} | {_fmt(o, spec)} | {_ratio(o, p)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bursts of 50, fewer sequential samples")
    parser.add_argument("--no-peer", action="store_true", help="ours only; the peer's recorded figures")
    args = parser.parse_args(argv)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    ours = measure_ours(args.quick)
    if args.no_peer:
        peer = _reference()
        peer, note = peer, f"recorded: {peer.get('source', 'none')}"
    else:
        peer, note = measure_peer(args.quick)
    report = table(ours, peer, note)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (results / f"peer-{stamp}.json").write_text(json.dumps({"ours": ours, "peer": peer, "peer_note": note,
                                                            "command": " ".join(sys.argv)}, indent=2, default=str))
    (results / f"peer-{stamp}.md").write_text(report + "\n")
    print(report)
    print("flux-dagster sequential phases, p50 (s):", json.dumps(ours["sequential_phases_p50_s"]))
    print("flux-dagster CPU-s per execution by process:", json.dumps(ours["cpu_s_per_execution_by_kind"], indent=1))


if __name__ == "__main__":
    main()
