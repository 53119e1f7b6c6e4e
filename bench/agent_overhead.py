"""Overhead per node of ``process_agent`` (one step per node, forkserver executor): a 10-node chain
and a 10-node fan-out of math nodes (work ≈ 0), against a 1-node flow, on SQLite storage.

    .venv/bin/python -m bench.agent_overhead [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="flux-agent-bench-"))
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ.update({"FLUX_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
                       "FLUX_DATABASE_URL": f"sqlite:///{home / 'app.db'}"})
    sys.path.insert(0, str(REPO))

    from dagster import DagsterInstance, execute_job, reconstructable

    from flux_dagster import demo
    from flux_dagster.db.engine import create_schema, session_scope
    from flux_dagster_tests.conftest import add_flow, agent_run_request, enqueue_agent

    url = os.environ["FLUX_DATABASE_URL"]
    create_schema(url)
    with session_scope(url) as s:
        demo.seed(s)
    math = ("mathFunction", {"formula": "1 + 1", "variables": []})
    shapes = {
        "1 node": ({"n0": math}, []),
        "10-node chain": ({f"n{i}": math for i in range(10)}, [(f"n{i}", f"n{i + 1}") for i in range(9)]),
        "10-node fan-out": ({f"n{i}": math for i in range(11)}, [("n0", f"n{i}") for i in range(1, 11)]),
    }
    results: dict[str, list[float]] = {}
    with DagsterInstance.get() as instance:
        for name, (nodes, edges) in shapes.items():
            for _ in range(args.repeat):
                flow_id = add_flow(url, nodes, edges)
                pending_id, _ = enqueue_agent(url, flow_id)
                request = agent_run_request(url, pending_id)
                started = time.perf_counter()
                result = execute_job(reconstructable(agent_job), instance, run_config=request.run_config,
                                     tags=request.tags)
                assert result.success, name
                results.setdefault(name, []).append(time.perf_counter() - started)
    base = statistics.median(results["1 node"])
    chain = statistics.median(results["10-node chain"])
    fan = statistics.median(results["10-node fan-out"])
    print(json.dumps({
        "runs_s": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
        "one_node_run_s": round(base, 2),
        "chain_overhead_per_node_s": round((chain - base) / 9, 3),
        "fan_out_overhead_per_node_s": round((fan - base) / 10, 3),
        "parallelism": int(os.environ.get("FLUX_AGENT_PARALLELISM", "4")),
    }, indent=2))


def agent_job():
    from flux_dagster.definitions import defs

    return defs.get_job_def("process_agent")


if __name__ == "__main__":
    main()
