"""The delivery egress guard (``EGRESS_POLICY_MODE``, reference §2.3) on the node guard's HTTP
request (:func:`flux_dagster.nodes.netguard.guarded_request`: every hop resolved, checked and
connected to the checked address). Callbacks and attachment downloads to a loopback, private or
metadata address are

- ``report`` (default): logged as ``egress_would_refuse``, still sent;
- ``enforce``: refused, not retried (hosts/CIDRs in ``FLUX_DELIVERY_ALLOWED_HOSTS`` excepted);
- ``off``: not checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from flux_dagster.delivery.outcome import DeliveryFailure
from flux_dagster.errors import IntegrationError, UserConfigError
from flux_dagster.nodes import netguard
from flux_dagster.nodes.netguard import AllowList, IpAddress

log = logging.getLogger(__name__)

T = TypeVar("T")
EGRESS_MODES = ("report", "enforce", "off")
ALLOWED_HOSTS_ENV = "FLUX_DELIVERY_ALLOWED_HOSTS"


@dataclass(frozen=True)
class EgressPolicy(AllowList):
    """The allow-list under a mode: what the list does not permit is refused (``enforce``),
    logged and let through (``report``) or let through (``off``)."""

    mode: str = "report"

    def permits(self, host: str, address: IpAddress) -> bool:
        if self.mode == "off" or super().permits(host, address):
            return True
        if self.mode == "report":
            log.warning("egress_would_refuse host=%s address=%s", host, address)
            return True
        raise DeliveryFailure(
            f"The delivery host {host!r} resolves to the non-public address {address}; EGRESS_POLICY_MODE=enforce "
            f"refuses it unless {ALLOWED_HOSTS_ENV} allows it.", code="EGRESS_REFUSED", retryable=False, host=host)


def retryable_status(status: int) -> bool:
    """Statuses worth another attempt (reference §2.3): 5xx, 408, 425, 429."""
    return status >= 500 or status in (408, 425, 429)


def parse_url(value: str, what: str) -> httpx.URL:
    """A callback URL comes from the user (or an edge): a value that is not an http(s) URL fails
    at once, never retried. The message never repeats the value (it may hold a secret path)."""
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise DeliveryFailure(f"The {what} is not an http(s) URL.", code="INVALID_URL", retryable=False)
    return url


def guarded_request(client: httpx.Client, method: str, url: httpx.URL, policy: EgressPolicy,
                    read: Callable[[httpx.Response], T], *, headers: dict[str, str] | None = None,
                    content: bytes | None = None) -> T:
    """``read(final response)``; transport errors propagate as httpx's."""
    try:
        return netguard.guarded_request(client, method, url, read, allow=policy, env_name=ALLOWED_HOSTS_ENV,
                                        what="delivery host", headers=headers, content=content)
    except IntegrationError as exc:  # the name does not resolve (now): transient
        raise DeliveryFailure(exc.user_message, code="DNS", retryable=True, host=url.host) from exc
    except UserConfigError as exc:  # too many redirects, a redirect to a non-HTTP URL
        raise DeliveryFailure(exc.user_message, code="REDIRECT", retryable=False, host=url.host) from exc
