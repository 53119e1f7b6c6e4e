"""The ops of ``deliver_run_outputs``: thin over :mod:`flux_dagster.delivery`.

The email and callback steps retry by raising ``RetryRequested`` with the reference's capped
backoff (and the receiver's ``Retry-After``); after their last attempt they do not fail: they
return a ``failed`` result, so every other delivery (and the API v2 callback, last) still goes,
and the last steps report it and fail the run.
"""

from collections.abc import Callable

from dagster import (
    DynamicOut, DynamicOutput, Failure, OpExecutionContext, Out, Output, RetryRequested, op,
)

from flux_dagster import queue
from flux_dagster.delivery.outcome import DeliveryFailure, DeliveryResult
from flux_dagster.delivery.plan import NodeDelivery, PlanSummary, planned_deliveries, read_plan
from flux_dagster.delivery.resource import DeliveryResource
from flux_dagster.delivery.run import (
    EmailDone, api_callback_once, callback_once, email_once, failed_result, failure_report, outcome_message,
)
from flux_dagster.errors import classify
from flux_dagster.files.resource import FileStoreResource
from flux_dagster.ops.lifecycle import ExecutionParams
from flux_dagster.ops.retries import RETRY_POLICIES, delivery_retry_delay, node_errors
from flux_dagster.resources import AppDatabase, MainApiResource


def _attempt(context: OpExecutionContext, policy: str, channel: str, delivery_id: str, node_id: str | None,
             send: Callable[[], DeliveryResult]) -> DeliveryResult:
    """One attempt: retryable failures come back as a retry of this step; the last one, and any
    non-retryable failure, as a ``failed`` result."""
    try:
        result = send()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a retry or a result
        error = exc if isinstance(exc, DeliveryFailure) else classify(exc)
        attempt, retries = context.retry_number + 1, RETRY_POLICIES[policy].max_retries
        if error.retryable and context.retry_number < retries:
            delay = delivery_retry_delay(policy, context.retry_number, getattr(error, "retry_after_s", None))
            context.log.warning(f"{channel} attempt {attempt}/{retries + 1} failed, retried in {delay:.2f} s: {error}")
            raise RetryRequested(max_retries=retries, seconds_to_wait=delay) from exc
        context.log.error(f"{channel} failed for good after {attempt} attempt(s): {error}")
        return failed_result(channel, delivery_id, node_id, error, attempt)
    context.log.info(f"{channel}: {result.status}" + (f" ({result.error_message})" if result.error_message else ""))
    context.add_output_metadata({"status": result.status, "delivery_id": delivery_id})
    return result


@op(
    out={"deliveries": DynamicOut(NodeDelivery), "summary": Out(PlanSummary)},
    retry_policy=RETRY_POLICIES["load_delivery_plan"],
)
def load_delivery_plan(context: OpExecutionContext, config: ExecutionParams, app_db: AppDatabase,
                       file_store: FileStoreResource):
    """The row becomes ``running``; its plan (inline, or read from S3) becomes one step per output node."""
    with node_errors():
        with app_db.session() as session:
            row = queue.mark_running(session, config.pending_execution_id, context.run_id)
            payload = row.payload if row is not None else None
        plan, plan_key = read_plan(payload, file_store.store())
        deliveries, api_callback, skipped = planned_deliveries(plan)
    if skipped:
        context.log.info(skipped)
    for delivery in deliveries:
        yield DynamicOutput(delivery, mapping_key=delivery.mapping_key, output_name="deliveries")
    yield Output(PlanSummary(
        pending_execution_id=config.pending_execution_id, user_id=config.user_id, flow_id=plan.flowId,
        run_log_process_id=plan.runLogProcessId, run_status=plan.runStatus, run_type=plan.runType,
        plan_key=plan_key, api_callback=api_callback, skipped_reason=skipped,
    ), output_name="summary", metadata={"output_nodes": len(deliveries), "api_callback": api_callback is not None})


@op
def deliver_email(context: OpExecutionContext, delivery: NodeDelivery, delivery_settings: DeliveryResource) -> EmailDone:
    """The node's email: dedup claim → SMTP send → confirm."""
    if delivery.email is None:
        return EmailDone(delivery, None)
    result = _attempt(context, "deliver_email", "email", delivery.delivery_id("email"), delivery.node_id,
                      lambda: email_once(delivery, delivery_settings.smtp(), delivery_settings.dedup(),
                                         delivery_settings.egress()))
    return EmailDone(delivery, result)


@op
def deliver_callback(context: OpExecutionContext, done: EmailDone, delivery_settings: DeliveryResource) -> list:
    """The node's callback, after its email (withheld when the email was a duplicate)."""
    results = [done.email] if done.email is not None else []
    delivery = done.delivery
    if delivery.callback is not None:
        results.append(_attempt(context, "deliver_callback", "callback", delivery.delivery_id("callback"),
                                delivery.node_id, lambda: callback_once(done, delivery_settings.egress())))
    return results


@op
def deliver_api_callback(context: OpExecutionContext, summary: PlanSummary, node_results: list,
                         delivery_settings: DeliveryResource) -> list:
    """The API v2 consolidated callback to ``callback_url``, after every node's delivery."""
    results = [result for per_node in node_results for result in per_node]
    if summary.api_callback is not None:
        results.append(_attempt(context, "deliver_callback", "api_callback", summary.delivery_id(), None,
                                lambda: api_callback_once(summary, delivery_settings.egress())))
    return results


@op(retry_policy=RETRY_POLICIES["report_delivery_outcome"])
def report_delivery_outcome(context: OpExecutionContext, summary: PlanSummary, results: list,
                            main_api: MainApiResource) -> list:
    """``POST /worker/delivery-outcome`` for each delivery that failed for good."""
    failed = [failure_report(summary, r) for r in results if r.failed]
    if failed:
        with node_errors():
            main_api.client().report_delivery_failures(summary.user_id, failed)
        context.log.info(f"{len(failed)} failed deliver(ies) reported")
    return results


@op(retry_policy=RETRY_POLICIES["delete_delivery_plan"])
def delete_delivery_plan(context: OpExecutionContext, summary: PlanSummary, results: list, app_db: AppDatabase,
                         file_store: FileStoreResource) -> None:
    """The S3-held plan is deleted; the row ends ``completed``, or ``failed`` (and so does the run)
    when a delivery failed for good."""
    with node_errors():
        if summary.plan_key:
            file_store.store().delete(summary.plan_key)
        error = outcome_message(results)
        with app_db.session() as session:
            queue.finish(session, summary.pending_execution_id, context.run_id, "failed" if error else "completed",
                         error)
    counts = {status: sum(r.status == status for r in results) for status in sorted({r.status for r in results})}
    context.log.info(f"deliveries: {counts or 'none'}")
    if error:
        raise Failure(description=error, allow_retries=False)
