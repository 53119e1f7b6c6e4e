"""The text generator branch: validate access → generate → charge (reference §2.1)."""


from dagster import OpExecutionContext, op

from flux_dagster.errors import SystemError_
from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.nodes import text_generator as tg
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource
from flux_dagster.services.main_api import TokenCharge


@op(retry_policy=RETRY_POLICIES["validate_model_access"])
def validate_model_access(task: NodeTask, main_api: MainApiResource) -> NodeTask:
    with node_errors():
        ai_system, model = tg.resolve_model(task.data)
        main_api.client().validate_model_access(task.request.flow_id, model, ai_system)
    return task


@op(retry_policy=RETRY_POLICIES["text_generator"])
def text_generator(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, llm: LlmResource
) -> tg.TextGeneration:
    with node_errors():
        ai_system, model_name = tg.resolve_model(task.data)
        with app_db.session() as session:
            model = tg.find_model(session, model_name)
        generation = llm.client().generate(tg.build_request(task, model))  # no DB transaction held
        with app_db.session() as session:
            output = tg.persist_generation(session, task, generation, model)
    context.add_output_metadata(
        {"input_tokens": generation.input_tokens, "output_tokens": generation.output_tokens,
         "model": model_name, "provider": generation.provider}
    )
    return tg.TextGeneration(
        output=output, input_tokens=generation.input_tokens, output_tokens=generation.output_tokens,
        model=model_name, ai_system=ai_system,
        # The run that generated it: retries and re-executions reuse this output, hence the same key.
        generation_id=f"{context.run_id}/{context.op_handle}",
    )


@op(retry_policy=RETRY_POLICIES["charge_tokens"])
def charge_tokens(
    context: OpExecutionContext, task: NodeTask, generation: tg.TextGeneration, main_api: MainApiResource
) -> NodeOutcome:
    with node_errors():
        if generation.input_tokens is None or generation.output_tokens is None:
            raise SystemError_("The provider did not report token usage.")
        charge = TokenCharge(
            flow_id=task.request.flow_id, user_id=task.request.user_id, exec_id=task.request.exec_id,
            node_id=task.node_id, model=generation.model, ai_system=generation.ai_system,
            input_tokens=generation.input_tokens, output_tokens=generation.output_tokens,
            generation_id=generation.generation_id, label=task.label,
        )
        charged = main_api.client().charge_tokens(charge)
    if not charged:  # reference §3.5: log a refused charge, do not fail the execution
        context.log.warning(f"Billing refused the charge {charge.idempotency_key}")
    return NodeOutcome(task=task, output=generation.output, message="Node executed successfully",
                       extra={"charged": charged, "idempotency_key": charge.idempotency_key})
