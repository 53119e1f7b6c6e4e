"""The model picks one tool and its arguments (the MCP client, reference §4.10): one tool-calling
request, forced to call exactly one of the offered tools — OpenAI Chat Completions function
calling (openai and the OpenAI-compatible providers) or Anthropic Messages tool use. The
arguments are then checked against the tool's JSON Schema, so what reaches the tool is always
within it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema

from flux_dagster.errors import ProviderError
from flux_dagster.llm.providers import (
    PROVIDERS, LlmClient, ProviderCredentials, _anthropic_client, _openai_client, anthropic_errors, openai_errors,
)

OFFLINE_LABEL = "[offline LLM provider: the tool and its arguments were picked without a model]"
MAX_OUTPUT_TOKENS = 2048


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    name: str
    arguments: dict[str, Any]
    input_tokens: int
    output_tokens: int
    provider: str


def _openai_choice(company: str, model: str, system: str, prompt: str, tools: list[ToolSpec],
                   creds: ProviderCredentials, timeout_s: float) -> ToolChoice:
    functions = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.input_schema}} for t in tools]
    forced: Any = ({"type": "function", "function": {"name": tools[0].name}} if len(tools) == 1 else "required")
    with openai_errors(company):
        completion = _openai_client(creds.api_key, creds.base_url, timeout_s).chat.completions.create(
            model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            tools=functions, tool_choice=forced,
        )
    usage = completion.usage
    message = completion.choices[0].message if completion.choices else None
    calls = (message.tool_calls or []) if message else []
    if not calls:
        raise ProviderError(f"{company} answered without choosing a tool.")
    try:
        arguments = json.loads(calls[0].function.arguments or "{}")
    except ValueError as exc:
        raise ProviderError(f"{company} gave tool arguments that are not JSON.") from exc
    return ToolChoice(calls[0].function.name, arguments, usage.prompt_tokens if usage else 0,
                      usage.completion_tokens if usage else 0, company)


def _anthropic_choice(model: str, system: str, prompt: str, tools: list[ToolSpec], creds: ProviderCredentials,
                      timeout_s: float) -> ToolChoice:
    forced = {"type": "tool", "name": tools[0].name} if len(tools) == 1 else {"type": "any"}
    with anthropic_errors():
        message = _anthropic_client(creds.api_key, creds.base_url, timeout_s).messages.create(
            model=model, system=system, max_tokens=MAX_OUTPUT_TOKENS, messages=[{"role": "user", "content": prompt}],
            tools=[{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in tools],
            tool_choice=forced,
        )
    uses = [block for block in message.content if block.type == "tool_use"]
    if not uses:
        raise ProviderError("anthropic answered without choosing a tool.")
    arguments = uses[0].input if isinstance(uses[0].input, dict) else {}
    return ToolChoice(uses[0].name, arguments, message.usage.input_tokens, message.usage.output_tokens, "anthropic")


def _placeholder(schema: dict[str, Any], prompt: str) -> Any:
    kind = schema.get("type")
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    return {"string": prompt, "integer": 0, "number": 0, "boolean": False, "array": [],
            "object": {}}.get(kind if isinstance(kind, str) else "string", prompt)


def offline_choice(prompt: str, tools: list[ToolSpec]) -> ToolChoice:
    """Deterministic and labelled: the first tool offered, its required arguments filled in."""
    tool = tools[0]
    properties = tool.input_schema.get("properties") or {}
    arguments = {name: _placeholder(properties.get(name) or {}, prompt)
                 for name in tool.input_schema.get("required") or []}
    return ToolChoice(tool.name, arguments, max(len(prompt.split()), 1), 1, "offline")


def check_arguments(choice: ToolChoice, tools: list[ToolSpec]) -> None:
    """The chosen tool is one offered and its arguments fit its input schema."""
    offered = {t.name: t for t in tools}
    tool = offered.get(choice.name)
    if tool is None:
        raise ProviderError(f"The model chose the tool {choice.name!r}, which was not offered.")
    try:
        jsonschema.validate(choice.arguments, tool.input_schema)
    except jsonschema.ValidationError as exc:
        raise ProviderError(f"The model's arguments for the tool {choice.name!r} do not fit its schema: "
                            f"{exc.message[:300]}") from exc
    except jsonschema.SchemaError as exc:
        raise ProviderError(f"The tool {choice.name!r} has an invalid input schema: {exc.message[:300]}") from exc


def choose_tool(llm: LlmClient, company: str, model: str, system: str, prompt: str,
                tools: list[ToolSpec]) -> ToolChoice:
    """The model's pick, not yet checked: the caller pays for it first, then :func:`check_arguments`."""
    if not tools:
        raise ProviderError("There is no tool to choose from.")
    if llm.offline:
        choice = offline_choice(prompt, tools)
    else:
        spec = PROVIDERS.get(company)
        if spec is None:
            raise ProviderError(f"The provider {company!r} is not supported by this worker.")
        creds = llm.credentials.get(company)
        if creds is None:
            raise ProviderError(f"No API key is configured for {company} ({spec.key_env}).")
        if spec.sdk == "anthropic":
            choice = _anthropic_choice(model, system, prompt, tools, creds, llm.timeout_s)
        else:
            choice = _openai_choice(company, model, system, prompt, tools, creds, llm.timeout_s)
    return choice
