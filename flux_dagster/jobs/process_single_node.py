"""``process_single_node``: one run per node execution, one op per original activity, the branch
of the node's type visible as steps (the others show as skipped)."""

from dagster import in_process_executor, job

from flux_dagster.ops.lifecycle import (
    generate_execution_logs,
    get_info_in_database,
    node_execution_error,
    notify_status_completed,
    notify_status_pending,
)
from flux_dagster.ops.text_generator import charge_tokens, text_generator, validate_model_access


@job(executor_def=in_process_executor, hooks={node_execution_error})
def process_single_node():
    request = notify_status_pending()
    text_branch = get_info_in_database(request)

    text_task = validate_model_access(text_branch)
    text_done = charge_tokens(text_task, text_generator(text_task))

    notify_status_completed(generate_execution_logs([text_done]))
