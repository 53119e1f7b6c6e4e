"""LLM providers behind one call: the official ``openai`` and ``anthropic`` SDKs, the openai SDK
for OpenAI-compatible providers, and an offline deterministic provider for the embedded default.

The SDKs are imported where they are used: they are heavy, and most runs never touch one of them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flux_dagster.errors import ExecutionTimeoutError, ProviderError, provider_error_from_status


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


@dataclass(frozen=True)
class GenerationRequest:
    company: str
    model: str
    system: str
    messages: tuple[dict[str, str], ...]
    options: GenerationOptions = field(default_factory=GenerationOptions)


@dataclass(frozen=True)
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    reasoning: str = ""
    finish_reason: str | None = None
    provider: str = ""


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
        raise provider_error_from_status(company, exc.status_code, _detail(exc)) from exc
    except openai.APIConnectionError as exc:
        raise ProviderError(f"{company} could not be reached.", retryable=True) from exc


def _openai_generate(request: GenerationRequest, creds: ProviderCredentials, timeout_s: float) -> Generation:
    o = request.options
    params: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": "system", "content": request.system}, *request.messages],
    }
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
        completion = _openai_client(creds.api_key, creds.base_url, timeout_s).chat.completions.create(
            **params, extra_body=extra or None
        )
    choice = completion.choices[0] if completion.choices else None
    usage = completion.usage
    message = choice.message if choice else None
    return Generation(
        text=(message.content or "") if message else "",
        reasoning=getattr(message, "reasoning_content", None) or "" if message else "",
        input_tokens=usage.prompt_tokens if usage else 0,
        output_tokens=usage.completion_tokens if usage else 0,
        finish_reason=choice.finish_reason if choice else None,
        provider=request.company,
    )


@contextmanager
def anthropic_errors() -> Iterator[None]:
    """The anthropic SDK's exceptions as the worker's error classes (retryable or not)."""
    import anthropic

    try:
        yield
    except anthropic.APITimeoutError as exc:
        raise ExecutionTimeoutError("anthropic did not answer in time.") from exc
    except anthropic.APIStatusError as exc:
        raise provider_error_from_status("anthropic", exc.status_code, _detail(exc)) from exc
    except anthropic.APIConnectionError as exc:
        raise ProviderError("anthropic could not be reached.", retryable=True) from exc


def _anthropic_generate(request: GenerationRequest, creds: ProviderCredentials, timeout_s: float) -> Generation:
    o = request.options
    params: dict[str, Any] = {
        "model": request.model,
        "system": request.system,
        "messages": list(request.messages),
        "max_tokens": o.max_tokens or 4096,  # required by the Messages API
    }
    # This SDK release no longer declares the sampling parameters; the API still takes them.
    sampling = {name: value for name, value in (("temperature", o.temperature), ("top_p", o.top_p),
                                                ("top_k", o.top_k)) if value is not None}
    if o.stop:
        params["stop_sequences"] = list(o.stop)
    if o.reasoning and params["max_tokens"] > 2048:
        params["thinking"] = {"type": "enabled", "budget_tokens": params["max_tokens"] // 2}
    with anthropic_errors():
        message = _anthropic_client(creds.api_key, creds.base_url, timeout_s).messages.create(
            **params, extra_body=sampling or None
        )
    text = "".join(block.text for block in message.content if block.type == "text")
    reasoning = "".join(getattr(block, "thinking", "") for block in message.content if block.type == "thinking")
    return Generation(
        text=text,
        reasoning=reasoning,
        input_tokens=message.usage.input_tokens,
        output_tokens=message.usage.output_tokens,
        finish_reason=message.stop_reason,
        provider="anthropic",
    )


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
    return Generation(text=text, input_tokens=max(words_in, 1), output_tokens=len(text.split()), provider="offline")


@dataclass
class LlmClient:
    """``credentials`` maps a company to its key and base URL; ``offline`` answers without a network."""

    credentials: dict[str, ProviderCredentials]
    offline: bool = False
    timeout_s: float = 120.0

    def generate(self, request: GenerationRequest) -> Generation:
        if self.offline:
            return offline_generate(request)
        spec = PROVIDERS.get(request.company)
        if spec is None:
            raise ProviderError(f"The provider {request.company!r} is not supported by this worker.")
        creds = self.credentials.get(request.company)
        if creds is None:
            raise ProviderError(f"No API key is configured for {request.company} ({spec.key_env}).")
        if spec.sdk == "anthropic":
            return _anthropic_generate(request, creds, self.timeout_s)
        return _openai_generate(request, creds, self.timeout_s)
