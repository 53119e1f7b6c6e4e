"""One attempt of each delivery, as plain functions (the ops of ``deliver_run_outputs`` are thin
over these): the email with its dedup claim, the node callback after it, the API v2 callback, and
the reports of what failed for good."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flux_dagster.delivery.callback import node_callback_body, post_callback
from flux_dagster.delivery.dedup import EmailDedup
from flux_dagster.delivery.email import SmtpSettings, send_email
from flux_dagster.delivery.egress import EgressPolicy
from flux_dagster.delivery.outcome import DeliveryFailure, DeliveryResult
from flux_dagster.delivery.plan import NodeDelivery, PlanSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmailDone:
    """A node's delivery after its email step: the callback step decides from ``email``."""

    delivery: NodeDelivery
    email: DeliveryResult | None


def _redis_failure(exc: Exception) -> DeliveryFailure:
    return DeliveryFailure(f"The email dedup store (Redis) failed ({type(exc).__name__}).", code="REDIS",
                           retryable=True)


def email_once(delivery: NodeDelivery, smtp: SmtpSettings, dedup: EmailDedup | None, egress: EgressPolicy) -> DeliveryResult:
    """Claim → send → confirm; the claim is released when the send fails."""
    import redis

    assert delivery.email is not None
    owner = delivery.delivery_id("email")
    keys, claimed = (), ()
    if dedup is not None:
        keys = dedup.keys(delivery.flow_id, delivery.node_id, delivery.run_log_process_id, delivery.email)
        try:
            claim = dedup.claim(owner, keys)
        except redis.RedisError as exc:
            raise _redis_failure(exc) from exc
        if claim.state != "claimed":
            return DeliveryResult("email", owner, delivery.node_id, claim.state)
        claimed = claim.keys
    try:
        refused = send_email(delivery.email, smtp, owner, egress)
    except BaseException:
        if dedup is not None:
            try:
                dedup.release(owner, claimed)
            except redis.RedisError:  # the claim is this delivery's own: a retry takes it again
                log.warning("could not release the email claim of %s", owner)
        raise
    if dedup is not None:
        try:
            dedup.confirm(owner, keys)
        except redis.RedisError:  # sent: retrying now would send it twice
            log.warning("email %s sent, its dedup keys not confirmed", owner)
    message = f"{len(refused)} recipient(s) refused" if refused else None
    return DeliveryResult("email", owner, delivery.node_id, "sent", error_message=message)


def callback_withheld(done: EmailDone) -> str | None:
    """Why the node's callback must not go: its email was a duplicate, or a Gmail/Microsoft send failed."""
    email = done.email
    if email is None:
        return None
    if email.status == "duplicate":
        return "the email was suppressed as a duplicate"
    if email.failed and done.delivery.email is not None and done.delivery.email.sender != "smtp":
        return f"the {done.delivery.email.sender} email failed"
    return None


def callback_once(done: EmailDone, egress: EgressPolicy) -> DeliveryResult:
    delivery = done.delivery
    assert delivery.callback is not None
    delivery_id = delivery.delivery_id("callback")
    reason = callback_withheld(done)
    if reason:
        return DeliveryResult("callback", delivery_id, delivery.node_id, "withheld", error_message=reason)
    body = delivery.callback.body if delivery.callback.body is not None else node_callback_body(delivery)
    status = post_callback(delivery.callback.url, body, delivery_id, egress)
    return DeliveryResult("callback", delivery_id, delivery.node_id, "sent", status_code=status)


def api_callback_once(summary: PlanSummary, egress: EgressPolicy) -> DeliveryResult:
    assert summary.api_callback is not None
    delivery_id = summary.delivery_id()
    status = post_callback(summary.api_callback.url, summary.api_callback.body, delivery_id, egress,
                           what="callback_url")
    return DeliveryResult("api_callback", delivery_id, None, "sent", status_code=status)


def failed_result(channel: str, delivery_id: str, node_id: str | None, error: Exception, attempts: int) -> DeliveryResult:
    code = error.code if isinstance(error, DeliveryFailure) else "SYSTEM_ERROR"
    return DeliveryResult(channel, delivery_id, node_id, "failed", attempts=attempts, error_code=code,
                          error_message=str(error)[:500], host=getattr(error, "host", None),
                          status_code=getattr(error, "status_code", None))


def failure_report(summary: PlanSummary, result: DeliveryResult) -> dict:
    """The ``/worker/delivery-outcome`` body: channel, host and last status, never the URL path,
    the recipients or the payload."""
    return {
        "flowId": summary.flow_id, "nodeId": result.node_id, "channel": result.channel,
        "runType": summary.run_type, "attempts": result.attempts, "lastErrorCode": result.error_code,
        "lastErrorMessage": result.error_message, "host": result.host, "statusCode": result.status_code,
        "deliveryId": result.delivery_id, "runLogProcessId": summary.run_log_process_id,
    }


def outcome_message(results: list[DeliveryResult]) -> str | None:
    """The row's error when some delivery failed for good, else None."""
    failed = [r for r in results if r.failed]
    if not failed:
        return None
    text = f"{len(failed)} of {len(results)} deliveries failed: " + "; ".join(r.describe() for r in failed)
    return text if len(text) <= 2000 else text[:1997] + "..."
