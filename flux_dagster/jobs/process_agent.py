"""``process_agent``: one run per agent (flow) execution, one step per node.

Steps run in separate processes forked from a pre-loaded forkserver (so a node step costs
milliseconds to start, not an interpreter start), at most ``FLUX_AGENT_PARALLELISM`` at a time."""

import os

from dagster import job, multiprocess_executor

from flux_dagster.ops.agent import load_flow, run_agent_node
from flux_dagster.ops.lifecycle import node_execution_error

AGENT_PARALLELISM = int(os.environ.get("FLUX_AGENT_PARALLELISM", "4"))

agent_executor = multiprocess_executor.configured(
    {
        "max_concurrent": AGENT_PARALLELISM,
        "start_method": {"forkserver": {"preload_modules": ["flux_dagster.definitions"]}},
    },
    name="agent_executor",
)


@job(executor_def=agent_executor,
     description="A whole flow (a pending_executions row of kind agent): validates the graph, then one "
                 "step per node in dependency order, outputs fed to successors, independent nodes in "
                 "parallel (FLUX_AGENT_PARALLELISM). Started by pending_executions_sensor.")
def process_agent():
    # The execution-level error path covers loading the flow; nodes report their own errors.
    load_flow.with_hooks({node_execution_error})().map(run_agent_node)
