"""The audio transcriber branch (reference §4.8): no model-access check, no charge."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes.audio_transcriber import run_audio_transcriber
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MediaApisResource


@op(retry_policy=RETRY_POLICIES["audio_transcriber"])
def audio_transcriber(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, llm: LlmResource, media_apis: MediaApisResource
) -> NodeOutcome:
    with node_errors():
        outcome = run_audio_transcriber(app_db.session, task, llm=llm.client(), media=media_apis.client())
    context.add_output_metadata(outcome.extra)
    return outcome
