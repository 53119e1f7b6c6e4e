"""Where user-configured nodes may connect: public addresses only, unless an allow-list says so.

A node's URL or database host comes from the user. Without this guard a flow could reach the
worker's own loopback services, the private network it runs in, or a cloud metadata endpoint
(169.254.169.254). Every address the host resolves to is checked, and callers connect to the
address that was checked, so a DNS answer that changes between check and connect cannot slip
through. :func:`guarded_request` does all of that for HTTP, redirects included.

The allow-list env var holds comma-separated host names and/or CIDRs, e.g.
``FLUX_APICALLER_ALLOWED_HOSTS=127.0.0.1/32,db.internal``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import httpx

from flux_dagster.errors import IntegrationError, UserConfigError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")
MAX_REDIRECTS = 5


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


def http_url(text: str, *, what: str = "URL", field: str = "url") -> httpx.URL:
    """A user's http(s) URL, or a UserConfigError naming ``what`` it was meant to be."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise UserConfigError(f"The {what} {text!r} is not valid: {exc}.", field=field) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise UserConfigError(f"The {what} {text!r} must start with http:// or https://.", field=field)
    return url


def certificate_error(exc: BaseException) -> bool:
    """Whether a connection failed because the server's TLS certificate did not verify."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _pinned(client: httpx.Client, method: str, url: httpx.URL, headers: dict[str, str], content: bytes | None,
            allow: AllowList, env_name: str, what: str) -> Iterator[httpx.Response]:
    """One streamed request to ``url``'s checked addresses, tried in resolver order."""
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = resolve_permitted(url.host, port, allow, env_name, what)
    hop_headers = {**headers, "Host": url.netloc.decode("ascii")}
    # TLS: the name the user gave is both the SNI and the name the certificate must carry.
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(method, url.copy_with(host=str(address)), headers=hop_headers,
                                       content=content, extensions=extensions)
        try:
            response = client.send(request, stream=True)
        except httpx.ConnectError as exc:
            if certificate_error(exc):
                raise
            error = exc  # try the host's next address, as a client connecting by name would
            continue
        try:
            yield response
        finally:
            response.close()
        return
    raise error


def guarded_request(client: httpx.Client, method: str, url: httpx.URL, read: Callable[[httpx.Response], T], *,
                    allow: AllowList, env_name: str, what: str, headers: dict[str, str] | None = None,
                    content: bytes | None = None, max_redirects: int = MAX_REDIRECTS) -> T:
    """``read(final response)`` of one logical request, following redirects; every hop is
    checked by the guard and connected to the checked address. ``client`` must not follow
    redirects itself (see :func:`http_client`)."""
    headers = dict(headers or {})
    for _hop in range(max_redirects + 1):
        if url.scheme not in ("http", "https"):
            raise UserConfigError(f"Redirected to a non-HTTP URL ({url.scheme}).", field="url")
        with _pinned(client, method, url, headers, content, allow, env_name, what) as response:
            location = response.headers.get("location")
            if not (response.is_redirect and location):
                return read(response)
            status = response.status_code
        target = url.join(location)
        if status == 303 or (status in (301, 302) and method == "POST"):
            method, content = "GET", None
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
            # Credentials are for the origin the user named, never a redirect target.
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = target
    raise UserConfigError(f"Too many redirects (more than {max_redirects}).", field="url")


def http_client(verify: bool | ssl.SSLContext = True, timeout_s: float = 30.0) -> httpx.Client:
    """The client for one node run. trust_env=False: a proxy from the environment would resolve
    hosts itself, past the guard. No keep-alive: connections are keyed by the pinned address, so
    a pooled one verified for one host name must never serve another name on the same address."""
    return httpx.Client(verify=verify, timeout=timeout_s, trust_env=False, follow_redirects=False,
                        limits=httpx.Limits(max_keepalive_connections=0))


class GuardedAsyncTransport(httpx.AsyncHTTPTransport):
    """An httpx transport for clients the worker does not drive request by request (an SDK's):
    every request's host is checked by the guard and the connection made to the first checked
    address, with the original ``Host`` header and TLS server name."""

    def __init__(self, allow: AllowList, env_name: str, what: str, **kwargs):
        super().__init__(**kwargs)
        self.allow, self.env_name, self.what = allow, env_name, what

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        address = resolve_permitted(url.host, port, self.allow, self.env_name, self.what)[0]
        request.headers["Host"] = url.netloc.decode("ascii")
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": url.host}
        request.url = url.copy_with(host=str(address))
        return await super().handle_async_request(request)
