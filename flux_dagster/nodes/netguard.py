"""Where user-configured nodes may connect: public addresses only, unless an allow-list says so.

A node's URL or database host comes from the user. Without this guard a flow could reach the
worker's own loopback services, the private network it runs in, or a cloud metadata endpoint
(169.254.169.254). Every address the host resolves to is checked, and callers connect to the
address that was checked, so a DNS answer that changes between check and connect cannot slip
through.

The allow-list env var holds comma-separated host names and/or CIDRs, e.g.
``FLUX_APICALLER_ALLOWED_HOSTS=127.0.0.1/32,db.internal``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from flux_dagster.errors import IntegrationError, UserConfigError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_env(cls, name: str) -> AllowList:
        hosts: set[str] = set()
        networks = []
        for entry in (os.environ.get(name) or "").split(","):
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def permits(self, host: str, address: IpAddress) -> bool:
        return host.lower().rstrip(".") in self.hosts or any(address in net for net in self.networks)


def _public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    # is_global excludes loopback, private, link-local, CGNAT, reserved, multicast, unspecified.
    return address.is_global and not address.is_multicast


def resolve_permitted(host: str, port: int, allow: AllowList, env_name: str, what: str) -> list[IpAddress]:
    """The addresses to connect to, in resolver order; refuses when any of them is not permitted."""
    if not host:
        raise UserConfigError(f"The {what} has no host.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise IntegrationError(f"The host {host!r} could not be resolved.", dev_message=repr(exc)) from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    if not addresses:
        raise IntegrationError(f"The host {host!r} has no address.")
    for address in addresses:
        if not _public(address) and not allow.permits(host, address):
            raise UserConfigError(
                f"The {what} {host!r} resolves to the non-public address {address}; this worker refuses "
                f"loopback, private and link-local addresses unless {env_name} allows them."
            )
    return addresses
