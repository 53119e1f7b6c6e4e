"""LLM providers behind one call: the official ``openai`` and ``anthropic`` SDKs, the openai SDK
for OpenAI-compatible providers, and an offline deterministic provider for the embedded default.

Every live call streams (the original consumes ``streamText`` internally, reference §4.1 step 9):
the growing answer can be published as it arrives, and a cancelled call keeps what it said so
far. What a call said is gathered in a ``StreamState`` the caller owns, so even an interrupt
raised mid-stream leaves the partial answer and its usage readable.

Wire formats: Chat Completions (openai, groq, xai, perplexity, gemini), OpenAI's Responses API
(openai with web search: its ``web_search`` tool exists there only), Anthropic Messages.

The SDKs are imported where they are used: they are heavy, and most runs never touch one of them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flux_dagster.errors import ExecutionTimeoutError, ProviderError, UserConfigError, provider_error_from_status
from flux_dagster.llm import usage as usage_shapes
from flux_dagster.llm.usage import Usage


@dataclass(frozen=True)
class ProviderSpec:
    key_env: str
    base_url_env: str
    default_base_url: str | None
    sdk: str  # "openai" or "anthropic"


PROVIDERS: dict[str, ProviderSpec] = {
    "openai": ProviderSpec("OPENAI_API_KEY", "OPENAI_BASE_URL", None, "openai"),
    "anthropic": ProviderSpec("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", None, "anthropic"),
    "groq": ProviderSpec("GROQ_API_KEY", "GROQ_BASE_URL", "https://api.groq.com/openai/v1", "openai"),
    "xai": ProviderSpec("XAI_API_KEY", "XAI_BASE_URL", "https://api.x.ai/v1", "openai"),
    "perplexity": ProviderSpec("PPLX_API_KEY", "PERPLEXITY_BASE_URL", "https://api.perplexity.ai", "openai"),
    "gemini": ProviderSpec(
        "GENAI_API_KEY", "GEMINI_BASE_URL", "https://generativelanguage.googleapis.com/v1beta/openai/", "openai"
    ),
}

# How each company searches the web when a node has ``webSearch`` on (reference §4.1 step 8).
WEB_SEARCH = {
    "openai": "OpenAI's web_search tool (Responses API)",
    "anthropic": "Anthropic's web_search_20250305 tool",
    "perplexity": "Perplexity's own search (its citations are kept)",
}
ANTHROPIC_WEB_SEARCH_MAX_USES = 5

OFFLINE_LABEL = "[offline LLM provider: no provider API key is configured, this is a canned answer]"


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    reasoning: bool = False
    reasoning_effort: str | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    search_context_size: str | None = None
    web_search: bool = False
    web_search_max_uses: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    company: str
    model: str
    system: str
    messages: tuple[dict[str, str], ...]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    images: tuple[str, ...] = ()  # image URLs for the last user message

    @property
    def prompt_text(self) -> str:
        return self.system + "\n" + "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True)
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    reasoning: str = ""
    finish_reason: str | None = None
    provider: str = ""
    sources: tuple[dict, ...] = ()
    tool_calls: tuple[dict, ...] = ()
    tool_results: tuple[dict, ...] = ()
    reasoning_tokens: int = 0
    estimated: bool = False  # no usage reported: the tokens were counted
    cancelled: bool = False  # the stream was closed before the answer finished


@dataclass
class StreamState:
    """What a call said so far; ``on_text`` sees the whole answer after each new piece."""

    on_text: Callable[[str], None] | None = None
    text: str = ""
    reasoning: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    sources: list[dict] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    tool_results: list[dict] = field(default_factory=list)
    cancelled: bool = False
    provider: str = ""

    def add_text(self, delta: str | None) -> None:
        if delta:
            self.text += delta
            if self.on_text is not None:
                self.on_text(self.text)

    def add_source(self, url: str | None, title: str | None = None) -> None:
        if url and all(s["url"] != url for s in self.sources):
            self.sources.append({"id": f"source-{len(self.sources) + 1}", "url": url, "title": title or ""})

    def generation(self, request: GenerationRequest) -> Generation:
        """The answer: complete, or cut short (cancelled / interrupted) with the tokens used so far."""
        charged = usage_shapes.settle(self.usage, prompt=request.prompt_text, output=self.text + self.reasoning,
                                      cut_short=self.cancelled)
        return Generation(
            text=self.text, reasoning=self.reasoning, input_tokens=charged.input_tokens,
            output_tokens=charged.output_tokens, reasoning_tokens=charged.reasoning_tokens,
            finish_reason=self.finish_reason, provider=self.provider or request.company,
            sources=tuple(self.sources), tool_calls=tuple(self.tool_calls), tool_results=tuple(self.tool_results),
            estimated=charged.estimated, cancelled=self.cancelled,
        )


def never() -> bool:
    return False


@dataclass(frozen=True)
class ProviderCredentials:
    api_key: str
    base_url: str | None


@functools.lru_cache(maxsize=16)
def _openai_client(api_key: str, base_url: str | None, timeout_s: float):
    import openai

    # Retries are Dagster's job (RetryPolicy on the op), so the SDK makes one attempt.
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)


@functools.lru_cache(maxsize=4)
def _anthropic_client(api_key: str, base_url: str | None, timeout_s: float):
    import anthropic

    return anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)


@contextmanager
def openai_errors(company: str) -> Iterator[None]:
    """The openai SDK's exceptions as the worker's error classes (retryable or not)."""
    import openai

    try:
        yield
    except openai.APITimeoutError as exc:
        raise ExecutionTimeoutError(f"{company} did not answer in time.") from exc
    except openai.APIStatusError as exc:
        raise provider_error_from_status(company, exc.status_code, _detail(exc), exc.response.headers) from exc
    except openai.APIConnectionError as exc:
        raise ProviderError(f"{company} could not be reached.", retryable=True) from exc


@contextmanager
def anthropic_errors() -> Iterator[None]:
    """The anthropic SDK's exceptions as the worker's error classes (retryable or not)."""
    import anthropic

    try:
        yield
    except anthropic.APITimeoutError as exc:
        raise ExecutionTimeoutError("anthropic did not answer in time.") from exc
    except anthropic.APIStatusError as exc:
        raise provider_error_from_status("anthropic", exc.status_code, _detail(exc), exc.response.headers) from exc
    except anthropic.APIConnectionError as exc:
        raise ProviderError("anthropic could not be reached.", retryable=True) from exc


def _with_images(messages: tuple[dict[str, str], ...], images: tuple[str, ...], text_part: Callable[[str], dict],
                 image_part: Callable[[str], dict]) -> list[dict[str, Any]]:
    """The messages, the last (user) one carrying the image URLs as parts after its text."""
    out: list[dict[str, Any]] = [dict(m) for m in messages]
    if images:
        last = out[-1]
        last["content"] = [text_part(last["content"]), *(image_part(url) for url in images)]
    return out


# --- Chat Completions (openai, groq, xai, perplexity, gemini) ----------------------------------


def _chat_chunk(state: StreamState, chunk: Any) -> None:
    extra = chunk.model_extra or {}
    reported = usage_shapes.from_chat(chunk.usage) or usage_shapes.from_chat((extra.get("x_groq") or {}).get("usage"))
    if reported is not None:
        state.usage = reported
    for result in extra.get("search_results") or []:  # Perplexity: [{title, url, date}]
        if isinstance(result, dict):
            state.add_source(result.get("url"), result.get("title"))
    for url in extra.get("citations") or []:  # Perplexity: [url, …]
        state.add_source(url if isinstance(url, str) else None)
    for choice in chunk.choices:
        delta = choice.delta
        if delta is not None:
            state.add_text(delta.content)
            delta_extra = delta.model_extra or {}
            state.reasoning += delta_extra.get("reasoning_content") or delta_extra.get("reasoning") or ""
        if choice.finish_reason:
            state.finish_reason = choice.finish_reason


def _chat_stream(request: GenerationRequest, creds: ProviderCredentials, timeout_s: float, state: StreamState,
                 should_stop: Callable[[], bool]) -> None:
    o = request.options
    params: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": "system", "content": request.system},
                     *_with_images(request.messages, request.images, lambda t: {"type": "text", "text": t},
                                   lambda u: {"type": "image_url", "image_url": {"url": u}})],
        "stream": True,
    }
    if request.company != "perplexity":  # Perplexity reports usage on every chunk unasked
        params["stream_options"] = {"include_usage": True}
    if o.max_tokens:
        # OpenAI's own API wants max_completion_tokens (reasoning models refuse max_tokens).
        params["max_completion_tokens" if request.company == "openai" else "max_tokens"] = o.max_tokens
    for name, value in (("temperature", o.temperature), ("top_p", o.top_p), ("seed", o.seed)):
        if value is not None:
            params[name] = value
    if o.stop:
        params["stop"] = list(o.stop)
    if o.reasoning and o.reasoning_effort:
        params["reasoning_effort"] = o.reasoning_effort
    extra: dict[str, Any] = {}
    if o.top_k is not None and request.company != "openai":
        extra["top_k"] = o.top_k
    if o.search_context_size and request.company == "perplexity":
        extra["web_search_options"] = {"search_context_size": o.search_context_size}
    with openai_errors(request.company):
        stream = _openai_client(creds.api_key, creds.base_url, timeout_s).chat.completions.create(
            **params, extra_body=extra or None
        )
        with stream:
            for chunk in stream:
                _chat_chunk(state, chunk)
                if should_stop():
                    state.cancelled = True
                    break


# --- OpenAI Responses API (web search) --------------------------------------------------------


def _responses_final(state: StreamState, response: Any) -> None:
    """The finished response: its output items are the authoritative text, sources and tool calls."""
    text = ""
    for item in response.output or []:
        if item.type == "message":
            for part in item.content or []:
                if part.type == "output_text":
                    text += part.text
                    for note in part.annotations or []:
                        if note.type == "url_citation":
                            state.add_source(note.url, note.title)
        elif item.type == "web_search_call":
            action = item.action.model_dump(exclude_none=True) if getattr(item, "action", None) else {}
            state.tool_calls.append({"toolCallId": item.id, "toolName": "web_search",
                                     "input": {k: v for k, v in action.items() if k != "sources"}})
            state.tool_results.append({"toolCallId": item.id, "toolName": "web_search",
                                       "output": {"status": item.status, "sources": action.get("sources", [])}})
        elif item.type == "reasoning" and not state.reasoning:
            state.reasoning = "".join(s.text for s in item.summary or [])
    state.text = text
    state.usage = usage_shapes.from_responses(response.usage)
    incomplete = getattr(response, "incomplete_details", None)
    state.finish_reason = (incomplete.reason if incomplete is not None and incomplete.reason else
                           "stop" if response.status == "completed" else response.status)


def _responses_stream(request: GenerationRequest, creds: ProviderCredentials, timeout_s: float, state: StreamState,
                      should_stop: Callable[[], bool]) -> None:
    o = request.options
    params: dict[str, Any] = {
        "model": request.model,
        "instructions": request.system,
        "input": _with_images(request.messages, request.images, lambda t: {"type": "input_text", "text": t},
                              lambda u: {"type": "input_image", "image_url": u, "detail": "auto"}),
        "tools": [{"type": "web_search"}],
        "include": ["web_search_call.action.sources"],
        "store": False,
        "stream": True,
    }
    if o.max_tokens:
        params["max_output_tokens"] = o.max_tokens
    for name, value in (("temperature", o.temperature), ("top_p", o.top_p)):
        if value is not None:
            params[name] = value
    if o.reasoning and o.reasoning_effort:
        params["reasoning"] = {"effort": o.reasoning_effort}
    with openai_errors(request.company):
        stream = _openai_client(creds.api_key, creds.base_url, timeout_s).responses.create(**params)
        with stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    state.add_text(event.delta)
                elif event.type == "response.reasoning_summary_text.delta":
                    state.reasoning += event.delta
                elif event.type in ("response.completed", "response.incomplete"):
                    _responses_final(state, event.response)
                elif event.type in ("response.failed", "error"):
                    error = getattr(getattr(event, "response", None), "error", None) or event
                    raise ProviderError(f"openai request failed: {getattr(error, 'message', None) or 'the response failed'}",
                                        retryable=getattr(error, "code", None) in ("server_error", "rate_limit_exceeded"))
                if should_stop():
                    state.cancelled = True
                    break


# --- Anthropic Messages -----------------------------------------------------------------------


def _anthropic_message(state: StreamState, message: Any) -> None:
    """A message (final, or the snapshot of a stream cut short): text, thinking, search calls."""
    text, reasoning = "", ""
    for block in message.content or []:
        if block.type == "text":
            text += block.text
            for citation in getattr(block, "citations", None) or []:
                if citation.type == "web_search_result_location":
                    state.add_source(citation.url, citation.title)
        elif block.type == "thinking":
            reasoning += block.thinking
        elif block.type == "server_tool_use":
            state.tool_calls.append({"toolCallId": block.id, "toolName": block.name, "input": block.input})
        elif block.type == "web_search_tool_result":
            content = block.content
            if isinstance(content, list):
                results = [{"url": r.url, "title": r.title, "pageAge": getattr(r, "page_age", None)} for r in content]
                for r in results:
                    state.add_source(r["url"], r["title"])
                output: Any = results
            else:
                output = {"error": getattr(content, "error_code", "unavailable")}
            state.tool_results.append({"toolCallId": block.tool_use_id, "toolName": "web_search", "output": output})
    state.text, state.reasoning = text, reasoning or state.reasoning
    state.usage = usage_shapes.from_anthropic(message.usage)
    state.finish_reason = message.stop_reason


def _anthropic_stream(request: GenerationRequest, creds: ProviderCredentials, timeout_s: float, state: StreamState,
                      should_stop: Callable[[], bool]) -> None:
    o = request.options
    messages = _with_images(request.messages, request.images, lambda t: {"type": "text", "text": t},
                            lambda u: {"type": "image", "source": {"type": "url", "url": u}})
    # max_tokens is required by the Messages API.
    params: dict[str, Any] = {"model": request.model, "system": request.system, "messages": messages,
                              "max_tokens": o.max_tokens or 4096}
    # This SDK release no longer declares the sampling parameters; the API still takes them.
    sampling = {name: value for name, value in (("temperature", o.temperature), ("top_p", o.top_p),
                                                ("top_k", o.top_k)) if value is not None}
    if o.stop:
        params["stop_sequences"] = list(o.stop)
    if o.reasoning and params["max_tokens"] > 2048:
        params["thinking"] = {"type": "enabled", "budget_tokens": params["max_tokens"] // 2}
    if o.web_search:
        params["tools"] = [{"type": "web_search_20250305", "name": "web_search",
                            "max_uses": o.web_search_max_uses or ANTHROPIC_WEB_SEARCH_MAX_USES}]
    with anthropic_errors():
        with _anthropic_client(creds.api_key, creds.base_url, timeout_s).messages.stream(
            **params, extra_body=sampling or None
        ) as stream:
            for event in stream:
                if event.type == "text":
                    state.add_text(event.text)
                elif event.type == "thinking":
                    state.reasoning += event.thinking
                if should_stop():
                    state.cancelled = True
                    break
            if state.cancelled:
                # What arrived: the partial text, and the usage of the first event only.
                snapshot = stream.current_message_snapshot
                _anthropic_message(state, snapshot)
                state.finish_reason = None
            else:
                _anthropic_message(state, stream.get_final_message())


def _detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", exc))[:300]


def offline_generate(request: GenerationRequest) -> Generation:
    """Deterministic: the same request always gives the same answer, and says what it is."""
    task = " / ".join(m["content"] for m in request.messages[-1:]) + " | " + request.system
    digest = hashlib.sha256(f"{request.model}|{request.system}|{request.messages}".encode()).hexdigest()[:12]
    text = f"{OFFLINE_LABEL} model={request.model} digest={digest}. You asked: {task[:300]}"
    words_in = len(request.system.split()) + sum(len(m["content"].split()) for m in request.messages)
    return Generation(text=text, input_tokens=max(words_in, 1), output_tokens=len(text.split()), provider="offline",
                      finish_reason="stop")


def check_web_search(company: str) -> None:
    """A node asks for web search: a provider that cannot search fails instead of answering without."""
    if company not in WEB_SEARCH:
        raise UserConfigError(
            f"Web search is not available for {company} models in this worker (it is for "
            + ", ".join(sorted(WEB_SEARCH)) + "): turn webSearch off or choose another model.", field="webSearch")


@dataclass
class LlmClient:
    """``credentials`` maps a company to its key and base URL; ``offline`` answers without a network."""

    credentials: dict[str, ProviderCredentials]
    offline: bool = False
    timeout_s: float = 120.0

    def generate(self, request: GenerationRequest, state: StreamState | None = None,
                 should_stop: Callable[[], bool] = never) -> Generation:
        """Stream the answer into ``state`` (the caller's, so an interrupt leaves it readable);
        ``should_stop`` is asked after every event and closes the stream when it says so."""
        state = state if state is not None else StreamState()
        if request.options.web_search:
            check_web_search(request.company)
        if self.offline:
            generation = offline_generate(request)
            state.add_text(generation.text)
            return generation
        spec = PROVIDERS.get(request.company)
        if spec is None:
            raise ProviderError(f"The provider {request.company!r} is not supported by this worker.")
        creds = self.credentials.get(request.company)
        if creds is None:
            raise ProviderError(f"No API key is configured for {request.company} ({spec.key_env}).")
        state.provider = request.company
        if spec.sdk == "anthropic":
            _anthropic_stream(request, creds, self.timeout_s, state, should_stop)
        elif request.company == "openai" and request.options.web_search:
            _responses_stream(request, creds, self.timeout_s, state, should_stop)
        else:
            _chat_stream(request, creds, self.timeout_s, state, should_stop)
        return state.generation(request)
