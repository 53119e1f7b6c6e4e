"""``deliver_run_outputs``: one run per delivery plan (reference §2.3), one step per delivery.

Per output node two mapped steps, ``deliver_email`` then ``deliver_callback`` (dynamic mapping:
the plan decides how many nodes there are); the API v2 callback after all of them, then the
report of what failed for good and the plan's deletion. The in-process executor interleaves the
steps: while one waits for its retry (up to 2 min), the other nodes' steps run.
"""

from dagster import in_process_executor, job

from flux_dagster.ops.delivery import (
    deliver_api_callback, deliver_callback, deliver_email, delete_delivery_plan, load_delivery_plan,
    report_delivery_outcome,
)
from flux_dagster.ops.lifecycle import node_execution_error


@job(executor_def=in_process_executor, hooks={node_execution_error})
def deliver_run_outputs():
    deliveries, summary = load_delivery_plan()
    node_results = deliveries.map(lambda delivery: deliver_callback(deliver_email(delivery))).collect()
    results = report_delivery_outcome(summary, deliver_api_callback(summary, node_results))
    delete_delivery_plan(summary, results)
