"""``process_single_node``: one run per node execution, one op per original activity, the branch
of the node's type visible as steps (the others show as skipped)."""

from dagster import in_process_executor, job

from flux_dagster.ops.api_caller import api_caller
from flux_dagster.ops.audio_transcriber import audio_transcriber
from flux_dagster.ops.counter import counter
from flux_dagster.ops.files import display_box, generate_file
from flux_dagster.ops.image_generator import charge_image_credits, image_generator
from flux_dagster.ops.lifecycle import (
    generate_execution_logs,
    get_info_in_database,
    node_execution_error,
    notify_status_completed,
    notify_status_pending,
)
from flux_dagster.ops.math_function import math_function
from flux_dagster.ops.mcp_client import charge_mcp_tokens, mcp_client
from flux_dagster.ops.scripting import scripting
from flux_dagster.ops.sql_querier import sql_querier
from flux_dagster.ops.text_generator import charge_tokens, text_generator, validate_model_access


# Dagster's run retries (a dead run host) re-execute all steps: from failure would also run the
# branches of the other node types whenever the run died before the executor had skipped them, and
# those fail on the outputs their branch never produced. Nothing is done twice either way: a node
# that completed is reused, with its charge (ops/guards.py).
@job(executor_def=in_process_executor, hooks={node_execution_error}, tags={"dagster/retry_strategy": "ALL_STEPS"},
     description="One node execution (a pending_executions row of kind node): PENDING, read the node, "
                 "the branch of its type (the others show as skipped), logs, COMPLETED; on failure the "
                 "error path once. Started by pending_executions_sensor, one run per row.")
def process_single_node():
    request = notify_status_pending()
    branches = get_info_in_database(request)

    text_task = validate_model_access(branches.text_generator)
    text_done = generate_file(charge_tokens(text_task, text_generator(text_task)))
    api_done = api_caller(branches.api_caller)
    math_done = math_function(branches.math_function)
    counter_done = counter(branches.counter)
    sql_done = sql_querier(branches.sql_querier)
    script_done = scripting(branches.scripting)
    image_done = charge_image_credits(branches.image_generator, image_generator(branches.image_generator))
    audio_done = audio_transcriber(branches.audio_transcriber)
    mcp_done = charge_mcp_tokens(branches.mcp_client, mcp_client(branches.mcp_client))

    notify_status_completed(generate_execution_logs([
        text_done, display_box(branches.display_box), api_done, math_done, counter_done, sql_done, image_done, script_done,
        audio_done, mcp_done,
    ]))
