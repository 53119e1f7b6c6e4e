"""MCP client (``mcpNode``), reference §4.10: connect to the user's MCP server, let the model pick
one of its tools and the arguments (within the tool's input schema), call it, keep the result.

- Transport: Streamable HTTP first, the older HTTP+SSE transport when that fails; ``stdio`` (and
  anything that is not an http(s) URL) is refused: the worker never starts a user's program.
- The server URL comes from the user, so every request the SDK makes (the SSE transport's
  announced endpoint included) goes through the network guard (``FLUX_MCP_ALLOWED_HOSTS``).
- Budgets: 30 s to connect and list the tools, 120 s for the tool call; the result is capped at
  ``MCP_MAX_RESULT_BYTES`` (1.8 MB).
- Billing: the model's tokens are charged once per tool choice, whether the call then succeeds
  or fails. Two steps, so a retried charge never calls the tool again: :func:`choose_and_call`
  (never raises for a failed tool call, returns it), then :func:`charge_and_finish`. A tool call
  is never retried (a tool may have side effects); listing and the model's choice are.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import anyio
import httpx

from flux_dagster.errors import ExecutionTimeoutError, FluxError, IntegrationError, UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.llm.providers import LlmClient
from flux_dagster.llm.tool_choice import ToolChoice, ToolSpec, check_arguments, choose_tool
from flux_dagster.nodes import text_generator as tg
from flux_dagster.nodes.fields import Sessions, as_text, edge_texts, edge_value
from flux_dagster.nodes.netguard import AllowList, GuardedAsyncTransport, http_url
from flux_dagster.services.main_api import MainApi, TokenCharge, company_of

NODE_TYPE = "mcpNode"
ALLOWED_HOSTS_ENV = "FLUX_MCP_ALLOWED_HOSTS"
MAX_RESULT_ENV = "MCP_MAX_RESULT_BYTES"
DEFAULT_MAX_RESULT_BYTES = 1_800_000
LIST_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 120.0
DEFAULT_MODEL = ("openai", "gpt-4o-mini")
SYSTEM_PROMPT = ("You operate tools on an MCP server for the user. Call exactly one of the tools, with "
                 "arguments taken from the user's request.")
PREVIEWS_KEPT = 10


class ToolCallError(IntegrationError):
    """The tool call failed or the tool reported an error. Not retried: a tool may have side effects."""

    retryable = False


@dataclass(frozen=True)
class McpServerConfig:
    url: str
    headers: dict[str, str]
    tool: str | None  # the tool the user selected, else the model picks among all


@dataclass(frozen=True)
class McpCall:
    """What the charge step needs: the model's usage, and how the call went."""

    model: str
    ai_system: str
    generation_id: str
    tool: str
    arguments: dict[str, Any]
    input_tokens: int
    output_tokens: int
    transport: str
    result: str | None = None
    truncated: bool = False
    error: str | None = None


def _max_result_bytes() -> int:
    try:
        return max(int(os.environ.get(MAX_RESULT_ENV) or DEFAULT_MAX_RESULT_BYTES), 1)
    except ValueError:
        return DEFAULT_MAX_RESULT_BYTES


def server_config(data: dict[str, Any]) -> McpServerConfig:
    """``serverUrl``/``authToken``; ``integrationId`` rows (``user_integrations``) are not read here."""
    raw = as_text(edge_value(data, "serverUrl")).strip()
    if not raw:
        if data.get("integrationId"):
            raise UserConfigError("MCP integrations (integrationId) are not supported by this worker; "
                                  "set the node's serverUrl.", field="integrationId")
        raise UserConfigError("The MCP server URL is empty.", field="serverUrl")
    if raw.startswith("stdio") or "://" not in raw:
        raise UserConfigError("Only MCP servers over HTTP (Streamable HTTP or SSE) are supported; stdio servers "
                              "are refused.", field="serverUrl")
    http_url(raw, what="MCP server URL", field="serverUrl")
    token = as_text(edge_value(data, "authToken")).strip()
    tool = as_text(data.get("toolName") or data.get("selectedTool")).strip() or None
    return McpServerConfig(raw, {"Authorization": f"Bearer {token}"} if token else {}, tool)


def model_of(data: dict[str, Any]) -> tuple[str, str]:
    """(AiSystem, model) through the text generator's model fields; gpt-4o-mini when none is set."""
    if not data.get("AiSystem"):
        return DEFAULT_MODEL[0], as_text(data.get("aiModel")).strip() or DEFAULT_MODEL[1]
    return tg.resolve_model(data)


def prompt_of(data: dict[str, Any]) -> str:
    prompt = "\n".join(edge_texts(data, "prompt"))
    if not prompt:
        raise UserConfigError("The prompt is empty.", field="prompt")
    return prompt


def result_text(result: Any, max_bytes: int) -> tuple[str, bool]:
    """The tool result as text (text blocks, else the structured content), capped at ``max_bytes``."""
    parts = []
    for block in result.content or []:
        if getattr(block, "type", None) == "text":
            parts.append(block.text)
        elif getattr(block, "type", None) == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'content')} {getattr(block, 'mimeType', '')}]".replace(" ]", "]"))
    text = "\n".join(parts)
    if not text and getattr(result, "structuredContent", None) is not None:
        text = json.dumps(result.structuredContent)
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text, False
    return raw[:max_bytes].decode(errors="ignore"), True


def _leaf(exc: BaseException) -> BaseException:
    """The error that matters inside the SDK's (anyio's) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner = [e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _connection_error(exc: BaseException, url: str) -> FluxError:
    leaf = _leaf(exc)
    if isinstance(leaf, FluxError):  # e.g. the guard refused the host
        return leaf
    if isinstance(leaf, TimeoutError):
        return ExecutionTimeoutError(f"The MCP server did not list its tools within {LIST_TIMEOUT_S:.0f} s.")
    status = getattr(getattr(leaf, "response", None), "status_code", None)
    if status in (401, 403):
        return UserConfigError(f"The MCP server refused the credentials (HTTP {status}); check authToken.",
                               field="authToken")
    return IntegrationError(f"The MCP server at {url} could not be reached over Streamable HTTP or SSE.",
                            dev_message=f"{type(leaf).__name__}: {leaf}"[:1000])


def _client(config: McpServerConfig, headers: dict[str, Any] | None = None, timeout: Any = None,
            auth: Any = None) -> httpx.AsyncClient:
    """The SDK's HTTP client: every request through the guard, redirects left to the SDK."""
    return httpx.AsyncClient(
        headers={**config.headers, **(headers or {})}, auth=auth, trust_env=False, follow_redirects=False,
        timeout=timeout or httpx.Timeout(LIST_TIMEOUT_S, read=CALL_TIMEOUT_S + 5),
        transport=GuardedAsyncTransport(AllowList.from_env(ALLOWED_HOSTS_ENV), ALLOWED_HOSTS_ENV, "MCP server host"),
    )


@asynccontextmanager
async def _session(config: McpServerConfig, transport: str):
    from mcp import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client

    timeout = timedelta(seconds=LIST_TIMEOUT_S)
    if transport == "streamable-http":
        async with _client(config) as client, streamable_http_client(config.url, http_client=client) as (read, write, _):
            async with ClientSession(read, write, read_timeout_seconds=timeout) as session:
                yield session
    else:
        async with sse_client(config.url, timeout=LIST_TIMEOUT_S, sse_read_timeout=CALL_TIMEOUT_S + 5,
                              httpx_client_factory=lambda **kw: _client(config, **kw)) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=timeout) as session:
                yield session


async def _tools_and_call(config: McpServerConfig, choose) -> tuple[str, ToolChoice, Any]:
    """Connect (Streamable HTTP, then SSE), list, let ``choose`` pick, call: (transport, choice,
    the result or the call's exception)."""
    errors: list[BaseException] = []
    for transport in ("streamable-http", "sse"):
        listed = None
        try:
            async with _session(config, transport) as session:
                with anyio.fail_after(LIST_TIMEOUT_S):
                    await session.initialize()
                    listed = await session.list_tools()
                tools = [ToolSpec(t.name, t.description or "", t.inputSchema or {"type": "object"})
                         for t in listed.tools]
                if config.tool:
                    tools = [t for t in tools if t.name == config.tool]
                    if not tools:
                        raise UserConfigError(f"The MCP server has no tool named {config.tool!r}.", field="toolName")
                choice = await anyio.to_thread.run_sync(choose, tools)
                try:
                    check_arguments(choice, tools)  # after the choice: its tokens are charged either way
                    with anyio.fail_after(CALL_TIMEOUT_S):
                        result: Any = await session.call_tool(choice.name, choice.arguments,
                                                              read_timeout_seconds=timedelta(seconds=CALL_TIMEOUT_S))
                except Exception as exc:  # noqa: BLE001 - returned: the tokens are charged all the same
                    result = _leaf(exc)
            return transport, choice, result
        except Exception as exc:  # noqa: BLE001 - sorted below
            if listed is not None:  # connected: the model's choice failed, no other transport would help
                raise _leaf(exc) from exc
            errors.append(exc)
            if isinstance(_leaf(exc), FluxError):
                break  # refused by the guard: SSE would be refused the same way
    raise _connection_error(errors[-1], config.url) from errors[-1]


def choose_and_call(task: NodeTask, *, llm: LlmClient, main_api: MainApi, generation_id: str) -> McpCall:
    """List the tools, let the model choose, call the tool. Raises only before the tool is called."""
    data = task.data
    config = server_config(data)
    ai_system, model_name = model_of(data)
    prompt = prompt_of(data)
    main_api.validate_model_access(task.request.flow_id, model_name, ai_system)
    company = company_of(ai_system)

    def choose(tools: list[ToolSpec]) -> ToolChoice:
        return choose_tool(llm, company, tg.api_model_id(company, model_name), SYSTEM_PROMPT, prompt, tools)

    transport, choice, result = anyio.run(_tools_and_call, config, choose)
    call = McpCall(model=model_name, ai_system=ai_system, generation_id=generation_id, tool=choice.name,
                   arguments=choice.arguments, input_tokens=choice.input_tokens, output_tokens=choice.output_tokens,
                   transport=transport)
    if isinstance(result, BaseException):
        if isinstance(result, FluxError):
            message = result.user_message
        elif isinstance(result, TimeoutError):
            message = f"The MCP tool {choice.name!r} did not answer within {CALL_TIMEOUT_S:.0f} s."
        else:
            message = f"The MCP tool call {choice.name!r} failed: {type(result).__name__}: {result}"
        return replace(call, error=message[:2000])
    text, truncated = result_text(result, _max_result_bytes())
    if result.isError:
        return replace(call, error=f"The MCP tool {choice.name!r} reported an error: {text[:1500]}")
    return replace(call, result=text, truncated=truncated)


def mcp_charge(task: NodeTask, call: McpCall) -> TokenCharge:
    request = task.request
    return TokenCharge(
        flow_id=request.flow_id, user_id=request.user_id, exec_id=request.exec_id, node_id=task.node_id,
        model=call.model, ai_system=call.ai_system, input_tokens=call.input_tokens,
        output_tokens=call.output_tokens, generation_id=call.generation_id, label=task.label,
    )


def charge_and_finish(sessions: Sessions, main_api: MainApi, task: NodeTask, call: McpCall) -> NodeOutcome:
    """Charge the model's tokens once (idempotency key), then record the result or fail with the
    call's error: either way the tokens are paid for."""
    charge = mcp_charge(task, call)
    charged = main_api.charge_tokens(charge)
    if call.error is not None:
        raise ToolCallError(call.error)
    previews = [*(task.data.get("previewResponses") or []), call.result][-PREVIEWS_KEPT:]
    used = call.input_tokens + call.output_tokens
    try:
        node_used = int(task.data.get("nodeUsedTokens") or 0) + used
    except (TypeError, ValueError):
        node_used = used
    updates = {"text": call.result, "previewResponses": previews, "nodeUsedTokens": node_used,
               "toolCalls": [{"name": call.tool, "arguments": call.arguments}]}
    with sessions() as session:
        persist_node_success(
            session, task, data_updates=updates, output=call.result, output_type="text",
            metadata={"tool": call.tool, "transport": call.transport, "truncated": call.truncated,
                      "model": call.model, "inputTokens": call.input_tokens, "outputTokens": call.output_tokens},
        )
    return NodeOutcome(task=task, output={"text": call.result}, message="Node executed successfully",
                       extra={"charged": charged, "idempotency_key": charge.idempotency_key, "tool": call.tool})


# Calls made whose charge failed retryably, by generation id: ``process_agent`` retries a node's
# whole stage chain, and the retry must charge this call, not call the tool again.
_UNCHARGED: dict[str, McpCall] = {}


def run_mcp_client(sessions: Sessions, task: NodeTask, *, llm: LlmClient, main_api: MainApi,
                   generation_id: str) -> NodeOutcome:
    call = _UNCHARGED.pop(generation_id, None) or choose_and_call(task, llm=llm, main_api=main_api,
                                                                  generation_id=generation_id)
    try:
        return charge_and_finish(sessions, main_api, task, call)
    except FluxError as exc:
        if exc.retryable:
            _UNCHARGED[generation_id] = call
        raise
