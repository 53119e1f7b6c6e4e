"""The text generator branch: validate access → generate → charge (reference §2.1)."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes import text_generator as tg
from flux_dagster.ops.guards import earlier_completion
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource, NotifierResource


@op(retry_policy=RETRY_POLICIES["validate_model_access"])
def validate_model_access(task: NodeTask, main_api: MainApiResource) -> NodeTask:
    with node_errors():
        tg.validate_access(main_api.client(), task)
    return task


@op(retry_policy=RETRY_POLICIES["text_generator"])
def text_generator(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, llm: LlmResource,
    main_api: MainApiResource, notifier: NotifierResource,
) -> tg.TextGeneration:
    if (earlier := earlier_completion(context, app_db, task)) is not None:
        return tg.reused_generation(task, earlier)
    with node_errors():
        generation = tg.generate(app_db.url, llm.client(), task, generation_id=f"{context.run_id}/{context.op_handle}",
                                 main_api=main_api.client(), notifier=notifier.client())
    context.add_output_metadata({"input_tokens": generation.input_tokens, "output_tokens": generation.output_tokens,
                                 "model": generation.model})
    return generation


@op(retry_policy=RETRY_POLICIES["charge_tokens"])
def charge_tokens(
    context: OpExecutionContext, task: NodeTask, generation: tg.TextGeneration, main_api: MainApiResource
) -> NodeOutcome:
    with node_errors():
        outcome = tg.charge(main_api.client(), task, generation)
    if not outcome.extra["charged"]:  # reference §3.5: log a refused charge, do not fail the execution
        context.log.warning(f"Billing refused the charge {outcome.extra['idempotency_key']}")
    return outcome
