"""The delivery egress guard (``EGRESS_POLICY_MODE``, reference §2.3) over the node guard
(:mod:`flux_dagster.nodes.netguard`): callbacks and attachment downloads to a loopback, private
or metadata address are

- ``report`` (default): logged as ``egress_would_refuse``, still sent;
- ``enforce``: refused, not retried (hosts/CIDRs in ``FLUX_DELIVERY_ALLOWED_HOSTS`` excepted);
  the request goes to the address that was checked;
- ``off``: not checked.
"""

from __future__ import annotations

import logging
from typing import Literal

import httpx

from flux_dagster.delivery.outcome import DeliveryFailure
from flux_dagster.errors import IntegrationError, UserConfigError
from flux_dagster.nodes.netguard import AllowList, resolve_permitted

log = logging.getLogger(__name__)

EgressMode = Literal["report", "enforce", "off"]
EGRESS_MODES = ("report", "enforce", "off")
ALLOWED_HOSTS_ENV = "FLUX_DELIVERY_ALLOWED_HOSTS"


def retryable_status(status: int) -> bool:
    """Statuses worth another attempt (reference §2.3): 5xx, 408, 425, 429."""
    return status >= 500 or status in (408, 425, 429)


def parse_url(value: str, what: str) -> httpx.URL:
    """A callback URL comes from the user (or an edge): a value that is not an http(s) URL fails
    at once, never retried."""
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise DeliveryFailure(f"The {what} is not an http(s) URL.", code="INVALID_URL", retryable=False)
    return url


def guarded_request(client: httpx.Client, method: str, url: httpx.URL, mode: EgressMode, allow: AllowList, *,
                    stream: bool = False, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    """One request (no redirects followed) under the guard; transport errors propagate as httpx's.
    ``stream=True``: the body is not read yet (the caller reads it, capped, and closes it)."""
    headers = dict(headers or {})

    def send(target: httpx.URL, **extra) -> httpx.Response:
        return client.send(client.build_request(method, target, headers=headers, **kwargs, **extra), stream=stream)

    if mode == "off":
        return send(url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = resolve_permitted(url.host, port, allow, ALLOWED_HOSTS_ENV, "delivery host")
    except UserConfigError as exc:
        if mode == "enforce":
            raise DeliveryFailure(exc.user_message, code="EGRESS_REFUSED", retryable=False, host=url.host) from exc
        log.warning("egress_would_refuse host=%s: %s", url.host, exc.user_message)
        return send(url)
    except IntegrationError as exc:  # the name does not resolve (now): transient
        raise DeliveryFailure(exc.user_message, code="DNS", retryable=True, host=url.host) from exc
    if mode == "report":
        return send(url)
    # enforce: connect to the checked address, so a DNS answer that changes cannot slip through.
    headers["Host"] = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    error: httpx.ConnectError | None = None
    for address in addresses:
        try:
            return send(url.copy_with(host=str(address)), extensions=extensions)
        except httpx.ConnectError as exc:
            error = exc  # the host's next address, as a client connecting by name would
    raise error


def http_client(timeout_s: float) -> httpx.Client:
    """trust_env=False: a proxy from the environment would resolve hosts past the guard. No
    keep-alive: pinned connections are keyed by address, never shared across host names."""
    return httpx.Client(timeout=timeout_s, trust_env=False, follow_redirects=False,
                        limits=httpx.Limits(max_keepalive_connections=0))
