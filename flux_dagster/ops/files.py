"""File generation after the text generator (reference §2.1 step 5, §3.6) and the display box
branch (§4.6)."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.files.resource import FileStoreResource
from flux_dagster.nodes import files
from flux_dagster.nodes.display_box import run_display_box
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase


def _file_metadata(context: OpExecutionContext, outcome: NodeOutcome) -> None:
    # The key, not the link: a presigned link is a credential for its lifetime.
    if "fileKey" in outcome.extra:
        context.add_output_metadata({"file_key": outcome.extra["fileKey"]})


@op(retry_policy=RETRY_POLICIES["generate_file"])
def generate_file(
    context: OpExecutionContext, outcome: NodeOutcome, app_db: AppDatabase, file_store: FileStoreResource
) -> NodeOutcome:
    """``generateFile``: the output as a file when ``saveOutput`` and ``fileType`` are set, else a pass-through."""
    with node_errors():
        done = files.save_output_file(app_db.url, file_store.store(), outcome)
    _file_metadata(context, done)
    return done


@op(retry_policy=RETRY_POLICIES["display_box"])
def display_box(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, file_store: FileStoreResource
) -> NodeOutcome:
    """``displayBox``: show the input, and save it as a file when ``saveOutput`` is on."""
    with node_errors():
        outcome = run_display_box(app_db.url, file_store.store(), task)
    _file_metadata(context, outcome)
    return outcome
