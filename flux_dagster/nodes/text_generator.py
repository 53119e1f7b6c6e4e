"""AI Text Generator (``commandTextNode``), reference §4.1."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import SystemAiModel, utcnow
from flux_dagster.errors import ExecutionCancelled, SystemError_, UserConfigError, classify, shorten
from flux_dagster.execution import (
    NodeOutcome, NodeTask, cancellation_check, persist_node_cancelled, persist_node_success,
)
from flux_dagster.llm.providers import Generation, GenerationOptions, GenerationRequest, LlmClient, StreamState
from flux_dagster.nodes.netguard import AllowList, http_url, resolve_permitted
from flux_dagster.services.main_api import MainApi, TokenCharge
from flux_dagster.services.notifications import Notifier, StreamPublisher

NODE_TYPE = "commandTextNode"

log = logging.getLogger(__name__)

MODEL_FIELD_BY_AI_SYSTEM = {
    "openai": "aiModel",
    "groq": "groqModel",
    "gemini": "geminiModel",
    "anthropicai": "anthropicModel",
    "perplexityai": "perplexityType",
    "xai": "aiModel",
}

ANTHROPIC_MODEL_IDS = {
    "claude-4-5-sonnet": "claude-sonnet-4-5-20250929",
    "claude-4-5-sonnet-latest": "claude-sonnet-4-5-20250929",
    "claude-4-5-opus": "claude-opus-4-5-20251101",
    "claude-4-5-haiku": "claude-haiku-4-5-20251001",
    "claude-4-sonnet": "claude-sonnet-4-20250514",
    "claude-4-opus": "claude-opus-4-20250514",
    "claude-3-sonnet": "claude-3-sonnet-20240229",
    "claude-3-opus": "claude-3-opus-20240229",
    "claude-3-haiku": "claude-3-haiku-20240307",
}

# (section title, *Data array field, plain field), in prompt order.
PROMPT_SECTIONS = (
    ("Persona", "personaData", "persona"),
    ("Instructions", "instructionData", "instruction"),
    ("Context", "contentData", "content"),
    ("Task", "promptData", "prompt"),
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
# Multimodal (§4.1 step 5): image URLs of the prompt become image parts, at most this many.
MAX_IMAGES = 3
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
URL_PATTERN = re.compile(r"https?://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]]")
# Image URLs pass the API caller's network guard (and its allow-list).
IMAGE_URL_ALLOWED_HOSTS_ENV = "FLUX_APICALLER_ALLOWED_HOSTS"
FALLBACK_USER_MESSAGE = "Complete the task described in the system prompt."
PREVIEW_RESPONSES_KEPT = 3


def resolve_model(data: dict[str, Any]) -> tuple[str, str]:
    """(AiSystem, model name) from the node's data, by the provider's model field."""
    ai_system = data.get("AiSystem")
    if not isinstance(ai_system, str) or ai_system.lower() not in MODEL_FIELD_BY_AI_SYSTEM:
        raise UserConfigError(f"Unknown or missing AI provider (AiSystem={shorten(ai_system)}).", field="AiSystem")
    model_field = MODEL_FIELD_BY_AI_SYSTEM[ai_system.lower()]
    model = data.get(model_field)
    if not isinstance(model, str) or not model.strip():
        raise UserConfigError(f"No model selected: {model_field} is empty.", field=model_field)
    return ai_system, model.strip()


def _texts(value: Any) -> list[str]:
    if isinstance(value, list):
        out = []
        for item in value:
            text = item.get("text") if isinstance(item, dict) else item
            if text not in (None, ""):
                out.append(text if isinstance(text, str) else json.dumps(text))
        return out
    if value in (None, ""):
        return []
    return [value if isinstance(value, str) else json.dumps(value)]


def section_text(data: dict[str, Any], data_field: str, plain_field: str) -> str:
    """A section: the edge-fed ``*Data`` items first, then the static field."""
    return "\n".join(t for t in (*_texts(data.get(data_field)), *_texts(data.get(plain_field))) if t.strip())


def build_system_prompt(data: dict[str, Any]) -> str:
    sections = [
        f"# {title}\n{text}"
        for title, data_field, plain_field in PROMPT_SECTIONS
        if (text := section_text(data, data_field, plain_field))
    ]
    return "\n\n".join(sections) if sections else DEFAULT_SYSTEM_PROMPT


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _first_words(entries: list[dict], limit: int) -> list[dict]:
    out: list[dict] = []
    for entry in entries:
        words = str(entry.get("content", "")).split()
        if limit <= 0:
            break
        out.append({**entry, "content": " ".join(words[:limit])})
        limit -= len(words)
    return out


def filter_memories(memories: list[dict], data: dict[str, Any]) -> list[dict]:
    """``processMemoryFilter``: which of the session's entries the model sees."""
    selected = data.get("selectedType") or "Load All Entries"
    if selected == "Load First X Entries":
        return memories[: max(_int(data.get("selectedIndex"), len(memories)), 0)]
    if selected == "Load Last X Entries":
        n = max(_int(data.get("selectedIndex"), len(memories)), 0)
        return memories[-n:] if n else []
    if selected == "Load First X Words":
        return _first_words(memories, _int(data.get("selectedNumber"), 0))
    if selected == "Load Last X Words":
        reversed_entries = [{**e, "content": " ".join(reversed(str(e.get("content", "")).split()))} for e in reversed(memories)]
        kept = _first_words(reversed_entries, _int(data.get("selectedNumber"), 0))
        return [{**e, "content": " ".join(reversed(e["content"].split()))} for e in reversed(kept)]
    return list(memories)


def session_memories(data: dict[str, Any], session_id: str | None) -> list[dict]:
    """The session's entries in ``userSessionsChat`` (``[{sessionId, memories: [...]}]``)."""
    for session in data.get("userSessionsChat") or []:
        if isinstance(session, dict) and session.get("sessionId") == session_id:
            return [m for m in session.get("memories") or [] if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    return []


def build_messages(data: dict[str, Any], session_id: str | None) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if data.get("memory"):
        if not session_id:
            raise UserConfigError("Memory is on but the execution has no session.", field="memory")
        messages = [
            {"role": m["role"], "content": str(m.get("content", ""))}
            for m in filter_memories(session_memories(data, session_id), data)
        ]
    if not messages or messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": FALLBACK_USER_MESSAGE})
    return messages


def _float(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _opt_int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number > 0 else None


def build_provider_options(company: str, data: dict[str, Any], model: SystemAiModel) -> GenerationOptions:
    """``buildProviderOptions``, then the reasoning and ``autoToken`` rules."""
    company = company.lower()
    d = data
    if company == "anthropic":
        opts = dict(max_tokens=_opt_int(d.get("anthropicToken")), temperature=_float(d.get("anthropicTemperature")),
                    top_p=_float(d.get("anthropicTopP")), top_k=_opt_int(d.get("anthropicTopK")))
    elif company == "gemini":
        opts = dict(max_tokens=_opt_int(d.get("geminiMaxOutputTokens")), temperature=_float(d.get("temperature")),
                    top_p=_float(d.get("topP")), top_k=_opt_int(d.get("topK")))
    elif company == "openai":
        opts = dict(max_tokens=_opt_int(d.get("aiTokens")), temperature=_float(d.get("aiTemperature")),
                    top_p=_float(d.get("aiPp")), top_k=_opt_int(d.get("aiFp")), reasoning_effort=d.get("aiEffort") or None)
    elif company == "perplexity":
        opts = dict(max_tokens=_opt_int(d.get("max_tokens")) or _opt_int(d.get("perplexityTokens")),
                    temperature=_float(d.get("temperature")), top_p=_float(d.get("topP")), top_k=_opt_int(d.get("topK")),
                    search_context_size=d.get("search_context_size") or None)
    elif company == "xai":
        opts = dict(max_tokens=_opt_int(d.get("aiTokens")), temperature=_float(d.get("aiTemperature")))
    elif company == "groq":
        stop = d.get("groqStop")
        opts = dict(max_tokens=_opt_int(d.get("groqMaxTokens")),
                    temperature=_float(d.get("temperature")), top_p=_float(d.get("topP")),
                    seed=_opt_int(d.get("seed")),
                    stop=tuple(stop) if isinstance(stop, list) and stop else ((stop,) if isinstance(stop, str) and stop else None))
    else:
        raise UserConfigError(f"The provider {company!r} is not supported by this worker.")
    reasoning = bool(model.supportsReasoning and (d.get("reasoning") or model.reasoningAlwaysOn))
    if reasoning:
        opts.update(temperature=None, top_p=None, top_k=None)
        opts["max_tokens"] = opts.get("max_tokens") or model.maxOutputToken
    if d.get("autoToken") and model.maxOutputToken:
        opts["max_tokens"] = model.maxOutputToken
    if d.get("webSearch"):
        opts.update(web_search=True, web_search_max_uses=_opt_int(d.get("webSearchMaxUses")))
    return GenerationOptions(reasoning=reasoning, **opts)


def api_model_id(company: str, model_name: str) -> str:
    return ANTHROPIC_MODEL_IDS.get(model_name, model_name) if company == "anthropic" else model_name


def is_image_url(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


def check_image_url(url: str) -> None:
    """The provider fetches the URL on the user's behalf: the API caller's rules apply."""
    parsed = http_url(url, what="image URL", field="multimodalEnabled")
    resolve_permitted(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80),
                      AllowList.from_env(IMAGE_URL_ALLOWED_HOSTS_ENV), IMAGE_URL_ALLOWED_HOSTS_ENV, "image URL")


def extract_images(data: dict[str, Any], model: SystemAiModel) -> tuple[dict[str, Any], tuple[str, ...]]:
    """With ``multimodalEnabled``: the first image URLs of the prompt (``promptData``, then
    ``prompt``), taken out of its text; a model that cannot see them is a user error."""
    if not data.get("multimodalEnabled"):
        return data, ()
    found: list[str] = []

    def take(match: re.Match) -> str:
        url = match.group(0)
        if len(found) < MAX_IMAGES and is_image_url(url):
            found.append(url)
            return ""
        return url

    def strip(value: Any) -> Any:
        if isinstance(value, str):
            return URL_PATTERN.sub(take, value).strip()
        if isinstance(value, list):
            return [{**item, "text": strip(item["text"])} if isinstance(item, dict) and isinstance(item.get("text"), str)
                    else strip(item) for item in value]
        return value

    stripped = {**data, "promptData": strip(data.get("promptData")), "prompt": strip(data.get("prompt"))}
    if not found:
        return data, ()
    if not model.isVisionModel:
        raise UserConfigError(f"The model {model.modelName} cannot read images (it is not a vision model): choose a "
                              "vision model or turn multimodal off.", field="multimodalEnabled")
    for url in found:
        check_image_url(url)
    return stripped, tuple(found)


@dataclass(frozen=True)
class TextGeneration:
    """What the branch passes on: what to charge, and what to show."""

    output: str
    input_tokens: int
    output_tokens: int
    model: str
    ai_system: str
    generation_id: str
    estimated: bool = False


def find_model(session: Session, model_name: str) -> SystemAiModel:
    model = session.scalar(select(SystemAiModel).where(SystemAiModel.modelName == model_name))
    if model is None:
        raise UserConfigError(f"The model {model_name} does not exist.")
    if not model.active:
        raise UserConfigError(f"The model {model_name} is not active.")
    session.expunge(model)
    return model


def build_request(task: NodeTask, model: SystemAiModel) -> GenerationRequest:
    company = model.aiCompany.lower()
    data, images = extract_images(task.data, model)
    return GenerationRequest(
        company=company,
        model=api_model_id(company, model.modelName),
        system=build_system_prompt(data),
        messages=tuple(build_messages(data, task.request.session_id)),
        options=build_provider_options(company, data, model),
        images=images,
    )


def generation_logs(generation: Generation) -> str:
    """The ``logs`` JSON of the newer original (§4.1 step 10)."""
    return json.dumps({"reasoning": generation.reasoning, "sources": list(generation.sources),
                       "toolCalls": list(generation.tool_calls), "toolResults": list(generation.tool_results),
                       "finishReason": generation.finish_reason})


def generation_metadata(generation: Generation, model: SystemAiModel, logs: str,
                        generation_id: str = "") -> dict[str, Any]:
    tokens = {"input": generation.input_tokens, "output": generation.output_tokens}
    if generation.reasoning_tokens:
        tokens["reasoning"] = generation.reasoning_tokens
    if generation.estimated:
        tokens["estimated"] = True
    # generationId: the charge key's part, so a re-execution that reuses this output reuses its charge.
    return {"tokens": tokens, "model": model.modelName, "aiCompany": model.aiCompany, "logs": logs,
            "provider": generation.provider, "generationId": generation_id}


def persist_cancelled(session: Session, task: NodeTask, generation: Generation, model: SystemAiModel) -> str:
    """The answer so far, kept as a partial output (``partialOutput: true``, CANCELLED)."""
    output = generation.text or generation.reasoning
    logs = generation_logs(generation)
    updates = {"text": output, "logs": logs,
               "nodeUsedTokens": _int(task.data.get("nodeUsedTokens"), 0) + generation.input_tokens + generation.output_tokens}
    persist_node_cancelled(session, task, updates, output, "text", generation_metadata(generation, model, logs))
    return output


def persist_generation(session: Session, task: NodeTask, generation: Generation, model: SystemAiModel,
                       generation_id: str = "") -> str:
    """Write ``text``, ``logs``, tokens, previews and session memory; return the output."""
    data = task.data
    output = generation.text or generation.reasoning
    logs = generation_logs(generation)
    now = utcnow().isoformat()
    previews = [*(data.get("previewResponses") or []), output][-PREVIEW_RESPONSES_KEPT:]
    updates: dict[str, Any] = {
        "text": output,
        "logs": logs,
        "nodeUsedTokens": _int(data.get("nodeUsedTokens"), 0) + generation.input_tokens + generation.output_tokens,
        "previewResponses": previews,
    }
    if data.get("partialOutput"):  # an earlier cancelled run's flag
        updates["partialOutput"] = False
    prompt = section_text(data, "promptData", "prompt")
    if data.get("memory") and prompt:
        sessions = [s for s in (data.get("userSessionsChat") or []) if isinstance(s, dict)]
        current = next((s for s in sessions if s.get("sessionId") == task.request.session_id), None)
        if current is None:
            current = {"sessionId": task.request.session_id, "memories": []}
            sessions.append(current)
        current["memories"] = [*(current.get("memories") or []),
                               {"role": "user", "content": prompt, "createdAt": now},
                               {"role": "assistant", "content": output, "createdAt": now}]
        updates["userSessionsChat"] = sessions
    persist_node_success(session, task, data_updates=updates, output=output, output_type="text",
                         metadata=generation_metadata(generation, model, logs, generation_id))
    return output


# --- the stages: one op each in process_single_node, called in a row by process_agent ----------


def validate_access(main_api: MainApi, task: NodeTask) -> None:
    """``validateModelAccess``: raises UserConfigError when the flow's owner may not use the model."""
    ai_system, model = resolve_model(task.data)
    main_api.validate_model_access(task.request.flow_id, model, ai_system)


def generate(database_url: str, llm: LlmClient, task: NodeTask, generation_id: str, *,
             main_api: MainApi, notifier: Notifier) -> TextGeneration:
    """``textGenerator``: stream the provider's answer and persist what it said.

    ``generation_id`` names this generation for billing: the caller derives it from the run that
    generates, so retries and re-executions that reuse this output reuse its charge key.

    With a ``socket_id`` the growing answer is published as it arrives (throttled). A cancellation
    (``cancel_requested_at``, seen between stream events, or the run's interrupt) closes the
    stream and settles here: the partial answer is kept and the tokens used so far are charged
    once, with the same idempotency key as a finished generation; then ``ExecutionCancelled``
    (or the interrupt) goes on."""
    ai_system, model_name = resolve_model(task.data)
    with session_scope(database_url) as session:
        model = find_model(session, model_name)
    request = build_request(task, model)
    publisher = StreamPublisher(notifier, task.request, task.node_id) if task.request.socket_id else None
    state = StreamState(on_text=publisher.update if publisher else None)
    should_stop = cancellation_check(database_url, task.request.pending_execution_id)
    try:
        generation = llm.generate(request, state, should_stop)  # no DB transaction held meanwhile
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise
        state.cancelled = True  # the run's interrupt, mid-stream: settle, then let it end the run
        _settle_cancelled(database_url, main_api, task, state.generation(request), model, ai_system,
                          generation_id, publisher)
        raise
    result = TextGeneration(output=generation.text or generation.reasoning, input_tokens=generation.input_tokens,
                            output_tokens=generation.output_tokens, model=model_name, ai_system=ai_system,
                            generation_id=generation_id, estimated=generation.estimated)
    if generation.cancelled:
        _settle_cancelled(database_url, main_api, task, generation, model, ai_system, generation_id, publisher)
        raise ExecutionCancelled("The execution was cancelled while the model was answering; the partial "
                                 "answer is kept.")
    with session_scope(database_url) as session:
        persist_generation(session, task, generation, model, generation_id)
    if publisher:
        publisher.finish(result.output, "COMPLETED", generation.input_tokens, generation.output_tokens)
    return result


def _settle_cancelled(database_url: str, main_api: MainApi, task: NodeTask, generation: Generation,
                      model: SystemAiModel, ai_system: str, generation_id: str,
                      publisher: StreamPublisher | None) -> None:
    with session_scope(database_url) as session:
        output = persist_cancelled(session, task, generation, model)
    partial = TextGeneration(output=output, input_tokens=generation.input_tokens, output_tokens=generation.output_tokens,
                             model=model.modelName, ai_system=ai_system, generation_id=generation_id,
                             estimated=generation.estimated)
    try:
        # Retried here: a retried op would generate again. A charge still failing stays ``pending``
        # in token_ledger, under the same key, for an operator to settle.
        for attempt in Retrying(stop=stop_after_attempt(4), wait=wait_exponential_jitter(initial=0.5, max=5),
                                retry=retry_if_exception(lambda e: classify(e).retryable), reraise=True):
            with attempt:
                charge(main_api, task, partial)
    except Exception:
        log.exception("The charge of cancelled generation %s could not be sent", generation_id)
    if publisher:
        publisher.finish(output, "CANCELLED", generation.input_tokens, generation.output_tokens)


def reused_generation(task: NodeTask, row) -> TextGeneration:
    """The generation an earlier run of this execution made and persisted (its charge key included)."""
    meta = row.metadata_ or {}
    tokens = meta.get("tokens") or {}
    ai_system, model_name = resolve_model(task.data)
    return TextGeneration(output=row.output or "", input_tokens=tokens.get("input"), output_tokens=tokens.get("output"),
                          model=meta.get("model") or model_name, ai_system=ai_system,
                          generation_id=meta.get("generationId") or f"{row.execId}/{task.node_id}",
                          estimated=bool(tokens.get("estimated")))


def charge(main_api: MainApi, task: NodeTask, generation: TextGeneration) -> NodeOutcome:
    """``chargeTokens``, exactly once per generation; a refused charge is reported, not fatal."""
    if generation.input_tokens is None or generation.output_tokens is None:
        raise SystemError_("The provider did not report token usage.")
    token_charge = TokenCharge(
        flow_id=task.request.flow_id, user_id=task.request.user_id, exec_id=task.request.exec_id,
        node_id=task.node_id, model=generation.model, ai_system=generation.ai_system,
        input_tokens=generation.input_tokens, output_tokens=generation.output_tokens,
        generation_id=generation.generation_id, label=task.label, estimated=generation.estimated,
    )
    charged = main_api.charge_tokens(token_charge)
    return NodeOutcome(task=task, output=generation.output, message="Node executed successfully",
                       extra={"charged": charged, "idempotency_key": token_charge.idempotency_key,
                              "input_tokens": generation.input_tokens, "output_tokens": generation.output_tokens})
