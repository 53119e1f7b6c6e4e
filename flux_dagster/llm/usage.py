"""Token usage in the shapes the providers report it, reduced to what is charged: input and output.

- Chat Completions (OpenAI and the OpenAI-compatible providers): ``prompt_tokens`` /
  ``completion_tokens``; reasoning tokens are part of ``completion_tokens`` at OpenAI, but some
  providers (xAI, Gemini's OpenAI endpoint) report them beside it — their ``total_tokens`` then
  counts them once more, and they are added to the output. Groq streams put the usage under
  ``x_groq.usage``.
- Responses API: ``input_tokens`` / ``output_tokens``, reasoning included in the output.
- Anthropic Messages: ``input_tokens`` excludes the prompt-cache tokens, which are input too;
  ``output_tokens`` includes the thinking tokens (``output_tokens_details.thinking_tokens``).
- No usage at all (a stream cut short, a provider that does not send it): the tokens are counted
  from the text, about four characters a token, and the charge is marked estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0  # already inside output_tokens; kept for the logs
    estimated: bool = False


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return default if value is None else value


def count_tokens(text: str) -> int:
    """An estimate for text the provider did not count: about four characters a token."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def from_chat(usage: Any) -> Usage | None:
    """Chat Completions ``usage`` (an SDK object or a dict), or None when there is none."""
    prompt, completion = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
    if prompt is None or completion is None:
        return None
    reasoning = int(_get(_get(usage, "completion_tokens_details"), "reasoning_tokens", 0) or 0)
    total = _get(usage, "total_tokens")
    if reasoning and total is not None and total >= prompt + completion + reasoning:
        completion += reasoning  # reported beside the completion, not inside it
    return Usage(int(prompt), int(completion), reasoning)


def from_responses(usage: Any) -> Usage | None:
    if usage is None or _get(usage, "input_tokens") is None:
        return None
    reasoning = int(_get(_get(usage, "output_tokens_details"), "reasoning_tokens", 0) or 0)
    return Usage(int(_get(usage, "input_tokens")), int(_get(usage, "output_tokens", 0)), reasoning)


def from_anthropic(usage: Any) -> Usage | None:
    if usage is None or _get(usage, "input_tokens") is None:
        return None
    cached = int(_get(usage, "cache_creation_input_tokens", 0) or 0) + int(_get(usage, "cache_read_input_tokens", 0) or 0)
    thinking = int(_get(_get(usage, "output_tokens_details"), "thinking_tokens", 0) or 0)
    return Usage(int(_get(usage, "input_tokens")) + cached, int(_get(usage, "output_tokens", 0)), thinking)


def settle(reported: Usage | None, *, prompt: str, output: str, cut_short: bool) -> Usage:
    """What to charge. A complete answer is charged as reported, or counted when nothing was
    reported. A stream cut short (cancelled) may hold only the usage of its first event: each
    side is the larger of the reported and the counted figure."""
    counted = Usage(count_tokens(prompt), count_tokens(output), estimated=True)
    if reported is None:
        return counted
    if not cut_short:
        return reported
    input_tokens = max(reported.input_tokens, counted.input_tokens if reported.input_tokens == 0 else 0)
    output_tokens = max(reported.output_tokens, counted.output_tokens)
    return Usage(input_tokens, output_tokens, reported.reasoning_tokens,
                 estimated=output_tokens != reported.output_tokens or input_tokens != reported.input_tokens)
