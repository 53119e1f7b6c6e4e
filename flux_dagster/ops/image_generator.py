"""The image generator branch (reference §4.9): generate and store, then charge, as two steps so a
retried charge never generates (and pays the provider for) a second image. Providers the
original charges before or right after the call are charged inside the first step, with the same
idempotency key, so the second finds their charge done."""

from dagster import OpExecutionContext, op

from flux_dagster.execution import NodeOutcome, NodeTask
from flux_dagster.files.resource import FileStoreResource
from flux_dagster.nodes import image_generator as ig
from flux_dagster.ops.guards import earlier_completion
from flux_dagster.ops.retries import RETRY_POLICIES, node_errors
from flux_dagster.resources import AppDatabase, LlmResource, MainApiResource, MediaApisResource


@op(retry_policy=RETRY_POLICIES["image_generator"])
def image_generator(
    context: OpExecutionContext, task: NodeTask, app_db: AppDatabase, llm: LlmResource, file_store: FileStoreResource,
    main_api: MainApiResource, media_apis: MediaApisResource,
) -> ig.StoredImage:
    if (earlier := earlier_completion(context, app_db, task)) is not None:
        return ig.reused_image(earlier)
    with node_errors():
        image = ig.generate_and_store(
            app_db.session, task, llm=llm.client(), store=file_store.store(),
            # The run that generated it: retries and re-executions reuse this output, hence the same key.
            generation_id=f"{context.run_id}/{context.op_handle}",
            main_api=main_api.client(), media=media_apis.client(),
        )
    # The key, not the link: a presigned link is a credential for its lifetime.
    context.add_output_metadata({"storage_key": image.key, "model": image.model, "provider": image.provider})
    return image


@op(retry_policy=RETRY_POLICIES["charge_image_credits"])
def charge_image_credits(
    context: OpExecutionContext, task: NodeTask, image: ig.StoredImage, main_api: MainApiResource
) -> NodeOutcome:
    with node_errors():
        outcome = ig.charge_image(main_api.client(), task, image)
    if not outcome.extra["charged"]:  # reference §3.5: log a refused charge, do not fail the execution
        context.log.warning(f"Billing refused the charge {outcome.extra['idempotency_key']}")
    return outcome
