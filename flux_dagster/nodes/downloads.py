"""Fetching a file from a URL the user gave (an audio file to transcribe, an image to edit):
streamed to disk under a size cap, every hop checked by the network guard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from flux_dagster.errors import ExecutionTimeoutError, IntegrationError, UserConfigError
from flux_dagster.nodes.netguard import AllowList, certificate_error, guarded_request, http_client, http_url

DOWNLOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Downloaded:
    size: int
    content_type: str
    path: str  # the final hop's path (after redirects): it names the file


@dataclass(frozen=True)
class Source:
    """What is being fetched, for the guard and for the user's error messages."""

    what: str  # "audio file", "input image"
    field: str  # the node field that holds the URL
    allowed_hosts_env: str
    max_bytes_env: str


def download(url_text: str, dest: Path, source: Source, *, max_bytes: int) -> Downloaded:
    url = http_url(url_text, what=f"{source.what} URL", field=source.field)
    allow = AllowList.from_env(source.allowed_hosts_env)

    def save(response: httpx.Response) -> Downloaded:
        status = response.status_code
        if status == 429 or status >= 500:
            raise IntegrationError(f"Downloading the {source.what} failed (HTTP {status}).")
        if status >= 400:
            raise UserConfigError(f"The {source.what} could not be downloaded (HTTP {status}).", field=source.field)
        too_large = UserConfigError(f"The {source.what} is larger than {max_bytes:,} bytes ({source.max_bytes_env}).",
                                    field=source.field)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_large
        size = 0
        with dest.open("wb") as out:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                out.write(chunk)
        if size == 0:
            raise UserConfigError(f"The {source.what} is empty.", field=source.field)
        return Downloaded(size, response.headers.get("content-type", ""), response.request.url.path)

    try:
        with http_client(True, DOWNLOAD_TIMEOUT_S) as client:
            return guarded_request(client, "GET", url, save, allow=allow, env_name=source.allowed_hosts_env,
                                   what=f"{source.what} URL host")
    except httpx.TimeoutException as exc:
        raise ExecutionTimeoutError(f"Downloading the {source.what} timed out.") from exc
    except httpx.ConnectError as exc:
        if certificate_error(exc):
            raise UserConfigError(f"The TLS certificate of {url.host} could not be verified.",
                                  field=source.field) from exc
        raise IntegrationError(f"The {source.what}'s host {url.host} could not be reached.") from exc
    except httpx.TransportError as exc:
        raise IntegrationError(f"Downloading the {source.what} failed.", dev_message=repr(exc)) from exc
