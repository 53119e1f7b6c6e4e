"""API caller (``apiCaller``), reference §4.3: one HTTP request (or a polling series of them) to a
user-configured URL, the response body written to the node, optionally filtered.

Every request and every redirect goes through :mod:`flux_dagster.nodes.netguard`: the host is
resolved, each of its addresses checked, and the connection made to the checked address (with the
original ``Host`` header and TLS server name), so loopback/private targets are refused unless
``FLUX_APICALLER_ALLOWED_HOSTS`` allows them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from flux_dagster import interrupts
from flux_dagster.errors import ExecutionTimeoutError, ProviderError, UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, merge_node_data, persist_node_success
from flux_dagster.nodes.fields import Sessions, as_text, edge_value
from flux_dagster.nodes.netguard import MAX_REDIRECTS, AllowList, certificate_error, guarded_request, http_client, http_url

NODE_TYPE = "apiCaller"
ALLOWED_HOSTS_ENV = "FLUX_APICALLER_ALLOWED_HOSTS"
MAX_RESULT_ENV = "APICALLER_MAX_RESULT_BYTES"
DEFAULT_MAX_RESULT_BYTES = 1_000_000
REQUEST_TIMEOUT_S = 30.0
MAX_CONDITION_CHARS = 10_000  # the user's regex runs on at most this much text (backtracking cost)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# Statuses that mean "try again later": retried by Dagster, and waited out while polling.
TRANSIENT_STATUSES = frozenset({408, 425, 429})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token


def is_transient(status: int) -> bool:
    return status in TRANSIENT_STATUSES or status >= 500


# Only these are repeated after the server may have seen the request (like the original, which
# made one attempt): a POST, PUT, PATCH or DELETE to a user's system could take effect twice.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def transport_error(method: str, exc: httpx.TransportError) -> Exception:
    """A request that never reached the server is retried whatever its method; one that may have
    (a timeout or a connection lost mid-request) only when its method is safe to repeat."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)) or method in SAFE_METHODS:
        return exc  # classified as retryable
    return ProviderError(f"The {method} request may have reached the server but got no answer ({type(exc).__name__}); "
                         "it is not repeated automatically.", retryable=False)


@dataclass(frozen=True)
class ApiRequest:
    method: str
    url: httpx.URL
    headers: dict[str, str]
    content: bytes | None
    verify: bool


@dataclass(frozen=True)
class ApiResponse:
    status: int
    text: str
    truncated: bool


def parse_lenient_json(text: str, field: str) -> Any:
    """JSON, or JSON whose object keys were left unquoted (``{a: 1}``), as the original accepts."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    quoted = re.sub(r"([{,]\s*)([A-Za-z_$][\w$]*)\s*:", r'\1"\2":', text)
    try:
        return json.loads(quoted)
    except ValueError as exc:
        raise UserConfigError(f"{field} is not valid JSON: {exc}.", field=field) from exc


def _pairs(items: Any) -> list[tuple[str, str]]:
    return [
        (str(item.get("key")).strip(), as_text(item.get("value")))
        for item in items or []
        if isinstance(item, dict) and str(item.get("key") or "").strip()
    ]


def _headers(data: dict[str, Any]) -> dict[str, str]:
    raw = edge_value(data, "jsonAuth")
    headers: dict[str, str] = {}
    if isinstance(raw, str) and raw.strip():
        raw = parse_lenient_json(raw, "jsonAuth")
    if isinstance(raw, dict):
        headers = {str(k): as_text(v) for k, v in raw.items()}
    elif raw not in (None, ""):
        raise UserConfigError("jsonAuth must be a JSON object of headers.", field="jsonAuth")
    username = as_text(edge_value(data, "username"))
    password = as_text(edge_value(data, "password"))
    if username or password:  # Basic auth wins over an Authorization header from jsonAuth
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    return headers


def _check_headers(headers: dict[str, str]) -> None:
    # Checked here: on the wire these fail as transport errors, which would be retried.
    for name, value in headers.items():
        if not _HEADER_NAME.match(name) or not value.isascii() or "\r" in value or "\n" in value:
            raise UserConfigError(f"The header {name!r} is not a valid HTTP header (ASCII name and value, "
                                  "one line).", field="jsonAuth")


def _body(data: dict[str, Any], method: str, content_type: str) -> bytes | None:
    if method == "GET":
        return None
    if content_type.lower().startswith(FORM_CONTENT_TYPE):
        return urlencode(_pairs(data.get("formDataParams"))).encode()
    raw = edge_value(data, "jsonRequestBody")
    if raw in (None, ""):
        return None
    if "json" not in content_type.lower():  # text/plain, XML…: sent as written
        return as_text(raw).encode()
    value = parse_lenient_json(raw, "jsonRequestBody") if isinstance(raw, str) else raw
    return json.dumps(value).encode()


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def build_request(data: dict[str, Any]) -> ApiRequest:
    method = str(data.get("method") or "GET").strip().upper()
    if method not in METHODS:
        raise UserConfigError(f"Unsupported HTTP method {method!r}.", field="method")
    raw_url = as_text(edge_value(data, "url")).strip()
    if not raw_url:
        raise UserConfigError("The URL is empty.", field="url")
    url = http_url(raw_url)
    params = _pairs(data.get("queryParams"))
    if params:
        url = url.copy_merge_params(params)
    headers = _headers(data)
    content_type = str(data.get("contentType") or "application/json").strip()
    content = _body(data, method, content_type)
    if content is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    _check_headers(headers)
    return ApiRequest(method, url, headers, content, _flag(data.get("validateCertificate"), True))


def _max_result_bytes() -> int:
    try:
        return max(int(os.environ.get(MAX_RESULT_ENV) or DEFAULT_MAX_RESULT_BYTES), 1)
    except ValueError:
        return DEFAULT_MAX_RESULT_BYTES


def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body: a huge response is never held in memory whole."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _decode(raw: bytes, response: httpx.Response) -> str:
    try:
        return raw.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


def send(client: httpx.Client, request: ApiRequest, allow: AllowList, max_bytes: int) -> ApiResponse:
    """One logical request, following redirects; every hop is checked by the guard and pinned."""

    def read(response: httpx.Response) -> ApiResponse:
        raw, truncated = _read_capped(response, max_bytes)
        return ApiResponse(response.status_code, _decode(raw, response), truncated)

    try:
        return guarded_request(client, request.method, request.url, read, allow=allow, env_name=ALLOWED_HOSTS_ENV,
                               what="URL host", headers=request.headers, content=request.content,
                               max_redirects=MAX_REDIRECTS)
    except httpx.ConnectError as exc:
        if certificate_error(exc):
            raise UserConfigError(
                f"The TLS certificate of {request.url.host} could not be verified; turn off "
                "validateCertificate to call it anyway.", field="validateCertificate",
            ) from exc
        raise


# ----- polling -------------------------------------------------------------------------------

_MISSING = object()
_PATH_TOKEN = re.compile(r"[^.\[\]]+|\[(\d+|\*|)\]")


def parse_path(path: str) -> list[str | int]:
    """``a.b[0].c``, ``a.b.0.c`` and ``items[*].id`` (``*`` = every item) into tokens."""
    tokens: list[str | int] = []
    for match in _PATH_TOKEN.finditer(path.strip()):
        if match.group(0).startswith("["):
            inner = match.group(1)
            tokens.append("*" if inner in ("*", "") else int(inner))
        else:
            tokens.append(match.group(0))
    return tokens


def lookup(value: Any, tokens: list[str | int]) -> Any:
    for i, token in enumerate(tokens):
        if token == "*":
            if not isinstance(value, list):
                return _MISSING
            found = [lookup(item, tokens[i + 1:]) for item in value]
            return [f for f in found if f is not _MISSING]
        if isinstance(value, dict) and str(token) in value:
            value = value[str(token)]
        elif isinstance(value, list) and str(token).isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return _MISSING
    return value


def _json_or_missing(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _MISSING


@dataclass(frozen=True)
class Polling:
    enabled: bool
    interval_s: float
    duration_s: float
    field: str
    pattern: re.Pattern | None

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Polling:
        def seconds(name: str, default: float) -> float:
            try:
                value = float(data.get(name))
            except (TypeError, ValueError):
                return default
            return value if value >= 0 else default

        match = as_text(data.get("pollingConditionMatch"))
        try:
            pattern = re.compile(match) if match else None
        except re.error as exc:
            raise UserConfigError(f"pollingConditionMatch is not a valid regular expression: {exc}.",
                                  field="pollingConditionMatch") from exc
        return cls(_flag(data.get("pollingEnabled"), False), seconds("pollingInterval", 5.0),
                   seconds("pollingRetryDuration", 60.0), as_text(data.get("pollingConditionField")).strip(), pattern)

    def keep_polling(self, response: ApiResponse) -> bool:
        """Transient statuses are waited out; a 2xx keeps polling while the condition matches."""
        if is_transient(response.status):
            return True
        if not 200 <= response.status < 300 or self.pattern is None:
            return False
        if self.field:
            value = lookup(_json_or_missing(response.text), parse_path(self.field))
            if value is _MISSING:
                return False
            subject = value if isinstance(value, str) else json.dumps(value)
        else:
            subject = response.text  # no field: the condition is matched against the whole body
        return self.pattern.search(subject[:MAX_CONDITION_CHARS]) is not None


def call(client: httpx.Client, request: ApiRequest, polling: Polling, *, allow: AllowList, max_bytes: int,
         sleep: Callable[[float], None], clock: Callable[[], float]) -> tuple[ApiResponse, int, bool]:
    """(last response, calls made, polling gave up) — polling keeps calling while it should."""
    deadline = clock() + polling.duration_s
    calls = 0
    while True:
        response = send(client, request, allow, max_bytes)
        calls += 1
        if not polling.enabled or not polling.keep_polling(response):
            return response, calls, False
        if clock() + polling.interval_s > deadline:
            return response, calls, True
        sleep(polling.interval_s)


# ----- output filter -------------------------------------------------------------------------


def apply_output_filter(text: str, output_filter: Any) -> tuple[str, Any]:
    """(filteredText, outputFilter to keep). The original drops a filter whose response shape
    changed; its shape hash is the front end's and undocumented, so here "changed" means a
    selected path no longer resolves in the new response."""
    if not isinstance(output_filter, dict) or not output_filter.get("selectedPaths"):
        return text, output_filter
    selected = output_filter["selectedPaths"]
    paths = [str(p) for p in (selected if isinstance(selected, list) else [selected]) if str(p).strip()]
    document = _json_or_missing(text)
    values = {path: lookup(document, parse_path(path)) for path in paths}
    if document is _MISSING or any(v is _MISSING for v in values.values()):
        return text, None
    if output_filter.get("mode") == "raw":
        return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in values.values()), output_filter
    return json.dumps(values, indent=2), output_filter


# ----- the node ------------------------------------------------------------------------------


def run_api_caller(sessions: Sessions, task: NodeTask, *, sleep: Callable[[float], None] = interrupts.sleep,
                   clock: Callable[[], float] = time.monotonic) -> NodeOutcome:
    request = build_request(task.data)
    polling = Polling.from_data(task.data)
    allow = AllowList.from_env(ALLOWED_HOSTS_ENV)
    with http_client(request.verify, REQUEST_TIMEOUT_S) as client:
        try:
            response, calls, gave_up = call(client, request, polling, allow=allow, max_bytes=_max_result_bytes(),
                                            sleep=sleep, clock=clock)
        except httpx.TransportError as exc:
            error = transport_error(request.method, exc)
            if error is exc:
                raise
            raise error from exc

    if gave_up or not 200 <= response.status < 300:
        if gave_up:
            message = (f"Polling gave up after {polling.duration_s:g} s and {calls} calls without the condition "
                       f"clearing (last response: HTTP {response.status}).")
            error: ProviderError | ExecutionTimeoutError = ExecutionTimeoutError(message)
            error.retryable = False  # a retry would only spend the same polling budget again
        else:
            message = f"HTTP {response.status}: {response.text[:1000]}"
            error = ProviderError(message, retryable=is_transient(response.status) and request.method in SAFE_METHODS,
                                  status_code=response.status)
        with sessions() as session:  # the body stays visible on the node; FAILED comes with the error path
            merge_node_data(session, task, {"text": response.text, "pollingCallCount": calls,
                                            "errorMessage": message, "errorStatusCode": response.status})
        raise error

    filtered, kept_filter = apply_output_filter(response.text, task.data.get("outputFilter"))
    updates = {"text": response.text, "filteredText": filtered, "outputFilter": kept_filter,
               "pollingCallCount": calls}
    output_type = "text" if _json_or_missing(response.text) is _MISSING else "json"
    with sessions() as session:
        persist_node_success(
            session, task, data_updates=updates, output=response.text, output_type=output_type,
            metadata={"statusCode": response.status, "truncated": response.truncated, "pollingCallCount": calls},
        )
    return NodeOutcome(task=task, output={"result": response.text}, message="Node executed successfully",
                       extra={"statusCode": response.status, "pollingCallCount": calls})
