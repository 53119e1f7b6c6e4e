"""Callbacks (reference §2.3): one JSON POST with ``X-FluxPrompt-Delivery-Id``.

Retryable: network errors, timeouts, 5xx, 408, 425, 429 (``Retry-After`` honoured). Anything else
— another status, a value that is not a URL, an address the egress guard refuses — is tried once.
"""

from __future__ import annotations

import email.utils
import json
import time
from datetime import datetime, timezone
from typing import Any

import httpx

from flux_dagster.delivery.egress import EgressPolicy, guarded_request, parse_url, retryable_status
from flux_dagster.delivery.outcome import DeliveryFailure
from flux_dagster.delivery.plan import NodeDelivery
from flux_dagster.nodes.netguard import http_client

DELIVERY_ID_HEADER = "X-FluxPrompt-Delivery-Id"
HTTP_TIMEOUT_S = 10.0


def node_callback_body(delivery: NodeDelivery) -> dict[str, Any]:
    """The worker's body for a node callback when the plan gives none."""
    body: dict[str, Any] = {
        "deliveryId": delivery.delivery_id("callback"), "flowId": delivery.flow_id,
        "runLogProcessId": delivery.run_log_process_id, "runStatus": delivery.run_status,
        "nodeId": delivery.node_id, "label": delivery.label, "output": delivery.output,
    }
    if delivery.batch_row is not None:
        body["batchRow"] = delivery.batch_row
    return body


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def post_callback(url_value: str, body: dict[str, Any], delivery_id: str, policy: EgressPolicy, *,
                  what: str = "callback URL") -> int:
    """POST once (redirects followed, each hop guarded); returns the 2xx status or raises
    :class:`DeliveryFailure`."""
    url = parse_url(url_value, what)
    headers = {DELIVERY_ID_HEADER: delivery_id, "User-Agent": "flux-dagster-delivery",
               "Content-Type": "application/json"}
    started = time.monotonic()
    try:
        with http_client(timeout_s=HTTP_TIMEOUT_S) as client:
            status, retry_after = guarded_request(
                client, "POST", url, policy, lambda r: (r.status_code, r.headers.get("retry-after")),
                headers=headers, content=json.dumps(body).encode())
    except httpx.TimeoutException as exc:
        raise DeliveryFailure(f"The callback to {url.host} timed out after {time.monotonic() - started:.0f} s.",
                              code="TIMEOUT", retryable=True, host=url.host) from exc
    except httpx.HTTPError as exc:  # refused, reset, TLS…: never reached the receiver's app
        raise DeliveryFailure(f"The callback to {url.host} could not connect ({type(exc).__name__}).",
                              code="CONNECTION", retryable=True, host=url.host) from exc
    if 200 <= status < 300:
        return status
    retryable = retryable_status(status)
    raise DeliveryFailure(
        f"The callback to {url.host} answered HTTP {status}.", code=f"HTTP_{status}", retryable=retryable,
        host=url.host, status_code=status, retry_after_s=retry_after_s(retry_after) if retryable else None,
    )
