"""Image generator (``imageGenerator``), reference §4.9: OpenAI's images API through the official
SDK, the image kept in the file store, its link written to the node, then charged (default 1
credit) once per generation.

Two steps, so a retried charge never pays for a second image: :func:`generate_and_store`, then
:func:`charge_image`. :func:`run_image_generator` runs both for callers outside a Dagster job.
Without an OpenAI key (the embedded default, ``LlmClient.offline``) a small deterministic PNG
that says OFFLINE stands in for the image.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from flux_dagster.errors import ExecutionTimeoutError, ProviderError, UserConfigError, provider_error_from_status
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.files.render import safe_name
from flux_dagster.files.store import FileStore
from flux_dagster.llm.providers import LlmClient, ProviderCredentials, _openai_client, openai_errors
from flux_dagster.nodes.fields import Sessions, as_text, edge_texts
from flux_dagster.services.main_api import MainApi, TokenCharge

NODE_TYPE = "imageGenerator"
DEFAULT_AI_SYSTEM = "openai"
# Providers the original runs through other SDKs and APIs; this worker has only OpenAI's.
OTHER_PROVIDERS = ("gemini", "fal", "meta", "stabilityai", "ideogram")
DEFAULT_MODEL = "dall-e-3"
CREDITS_PER_IMAGE = 1
PREVIEWS_KEPT = 10
MAX_DOWNLOAD_BYTES = 50_000_000
KEY_ROOT = "images"

# (label, field) in prompt order; each also read from its ``<field>Data`` edge array.
PROMPT_SECTIONS = (("View", "view"), ("Subject", "subject"), ("Environment", "environment"), ("Tone", "tone"))


@dataclass(frozen=True)
class ImageSpec:
    model: str
    prompt: str
    size: str


@dataclass(frozen=True)
class GeneratedImage:
    content: bytes
    content_type: str
    provider: str  # "openai" or "offline"


@dataclass(frozen=True)
class StoredImage:
    """What the charge step needs: the link, and which generation it pays for."""

    src: str
    key: str
    model: str
    provider: str
    generation_id: str


def ai_system_of(data: dict[str, Any]) -> str:
    ai_system = str(data.get("aiSystem") or DEFAULT_AI_SYSTEM).strip().lower()
    if ai_system == "opensources":
        raise UserConfigError("The 'opensources' image provider has been removed; choose another provider.",
                              field="aiSystem")
    if ai_system != "openai":
        raise UserConfigError(f"The image provider {ai_system!r} is not supported by this worker "
                              "(supported: openai).", field="aiSystem")
    return ai_system


def build_prompt(data: dict[str, Any]) -> str:
    """The prompt, then Style/View/Subject/Environment/Tone lines; a chosen style preset
    (``style_present``) replaces the free-text style, which is used only when the preset is "None"."""
    lines = edge_texts(data, "prompt")
    preset = as_text(data.get("style_present")).strip()
    style = [preset] if preset and preset.lower() != "none" else edge_texts(data, "style")
    sections = [("Style", style), *((label, edge_texts(data, name)) for label, name in PROMPT_SECTIONS)]
    lines += [f"{label}: {', '.join(texts)}" for label, texts in sections if texts]
    prompt = "\n".join(lines).strip()
    if not prompt:
        raise UserConfigError("The image prompt is empty.", field="prompt")
    return prompt


def _orientation(aspect_ratio: Any) -> str:
    try:
        width, height = (float(x) for x in str(aspect_ratio).split(":"))
    except ValueError:
        return "square"
    return "landscape" if width > height else "portrait" if width < height else "square"


def size_for(model: str, aspect_ratio: Any) -> str:
    """The closest size each model family accepts for the node's ``aspectRatio``."""
    orientation = _orientation(aspect_ratio)
    if model.startswith("dall-e-2") or orientation == "square":
        return "1024x1024"
    if model.startswith("dall-e-3"):
        return "1792x1024" if orientation == "landscape" else "1024x1792"
    return "1536x1024" if orientation == "landscape" else "1024x1536"


def image_spec(data: dict[str, Any]) -> ImageSpec:
    ai_system_of(data)
    model = as_text(data.get("aiModel")).strip() or DEFAULT_MODEL
    return ImageSpec(model=model, prompt=build_prompt(data), size=size_for(model, data.get("aspectRatio")))


# ----- the offline placeholder -----------------------------------------------------------------

_GLYPHS = {  # 3×5 pixel letters, enough to write OFFLINE
    "O": ("111", "101", "101", "101", "111"), "F": ("111", "100", "110", "100", "100"),
    "L": ("100", "100", "100", "100", "111"), "I": ("111", "010", "010", "010", "111"),
    "N": ("101", "111", "111", "101", "101"), "E": ("111", "100", "110", "100", "111"),
}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def placeholder_png(spec: ImageSpec, word: str = "OFFLINE", scale: int = 3, pad: int = 8) -> bytes:
    """A small RGB PNG writing ``word`` on a colour taken from the request: same request, same bytes."""
    digest = hashlib.sha256(f"{spec.model}|{spec.size}|{spec.prompt}".encode()).digest()
    background = bytes(64 + b // 2 for b in digest[:3])  # mid tones, so white text always reads
    width = 2 * pad + scale * (4 * len(word) - 1)
    height = 2 * pad + scale * 5
    rows = []
    for y in range(height):
        row = bytearray(background * width)
        glyph_row = (y - pad) // scale
        if 0 <= y - pad < 5 * scale:
            for i, letter in enumerate(word):
                for gx, bit in enumerate(_GLYPHS[letter][glyph_row]):
                    if bit == "1":
                        x0 = pad + scale * (4 * i + gx)
                        row[3 * x0: 3 * (x0 + scale)] = b"\xff" * 3 * scale
        rows.append(b"\x00" + bytes(row))  # filter type 0 per scanline
    label = f"Comment\x00FluxPrompt offline placeholder: no OpenAI key is configured. sha256={digest.hex()[:16]}"
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
        _png_chunk(b"tEXt", label.encode("latin-1")),
        _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 9)),
        _png_chunk(b"IEND", b""),
    ))


# ----- generation ------------------------------------------------------------------------------


def _content_type(content: bytes) -> tuple[str, str]:
    if content.startswith(b"\x89PNG"):
        return "image/png", "png"
    if content.startswith(b"\xff\xd8"):
        return "image/jpeg", "jpg"
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp", "webp"
    if content[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif", "gif"
    raise ProviderError("The image provider returned something that is not an image.")


def _download(url: str, timeout_s: float) -> bytes:
    """Only for providers that answer with a URL instead of base64 (the URL is the provider's)."""
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise provider_error_from_status("openai", response.status_code, "downloading the image failed")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ProviderError("The generated image is too large to store.")
                chunks.append(chunk)
    except httpx.TimeoutException as exc:
        raise ExecutionTimeoutError("Downloading the generated image timed out.") from exc
    except httpx.TransportError as exc:
        raise ProviderError("The generated image could not be downloaded.", retryable=True) from exc
    return b"".join(chunks)


def _openai_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float) -> bytes:
    params: dict[str, Any] = {"model": spec.model, "prompt": spec.prompt, "n": 1, "size": spec.size}
    if spec.model.startswith("dall-e"):  # the GPT image models always answer in base64 and refuse this
        params["response_format"] = "b64_json"
    with openai_errors("openai"):
        response = _openai_client(creds.api_key, creds.base_url, timeout_s).images.generate(**params)
    item = response.data[0] if response.data else None
    if item is not None and item.b64_json:
        try:
            return base64.b64decode(item.b64_json, validate=True)
        except ValueError as exc:
            raise ProviderError("openai returned an image that is not valid base64.") from exc
    if item is not None and item.url:
        return _download(item.url, timeout_s)
    raise ProviderError("openai returned no image.")


def generate(spec: ImageSpec, llm: LlmClient) -> GeneratedImage:
    if llm.offline:
        return GeneratedImage(placeholder_png(spec), "image/png", "offline")
    creds = llm.credentials.get("openai")
    if creds is None:
        raise ProviderError("No API key is configured for openai (OPENAI_API_KEY).")
    content = _openai_image(spec, creds, llm.timeout_s)
    return GeneratedImage(content, _content_type(content)[0], "openai")


def storage_key(task: NodeTask, extension: str) -> str:
    """One key per execution of the node: a retried step overwrites its image."""
    request = task.request
    parts = (safe_name(part) or "_" for part in (request.flow_id, task.node_id, request.exec_id))
    return "/".join((KEY_ROOT, *parts, f"image.{extension}"))


def generate_and_store(sessions: Sessions, task: NodeTask, *, llm: LlmClient, store: FileStore,
                       generation_id: str) -> StoredImage:
    """Generate, store, and write ``text``/previews/``nodeUsedTokens`` to the node."""
    spec = image_spec(task.data)
    image = generate(spec, llm)  # no DB transaction is open while the provider works
    content_type, extension = _content_type(image.content)
    key = storage_key(task, extension)
    stored = store.save(key, image.content, content_type=content_type,
                        download_name=f"{safe_name(task.label) or 'image'}.{extension}")
    data = task.data
    previews = [*(data.get("previewResponses") or []), stored.src][-PREVIEWS_KEPT:]
    try:
        used = int(data.get("nodeUsedTokens") or 0)
    except (TypeError, ValueError):
        used = 0
    updates = {"text": stored.src, "previewResponses": previews, "previewIndex": len(previews) - 1,
               "nodeUsedTokens": used + CREDITS_PER_IMAGE}
    with sessions() as session:
        persist_node_success(
            session, task, data_updates=updates, output=stored.src, output_type="image",
            metadata={"model": spec.model, "aiSystem": DEFAULT_AI_SYSTEM, "provider": image.provider,
                      "size": spec.size, "storageKey": stored.key, "credits": CREDITS_PER_IMAGE,
                      "generationId": generation_id},
        )
    return StoredImage(src=stored.src, key=stored.key, model=spec.model, provider=image.provider,
                       generation_id=generation_id)


def image_charge(task: NodeTask, image: StoredImage) -> TokenCharge:
    request = task.request
    return TokenCharge(
        flow_id=request.flow_id, user_id=request.user_id, exec_id=request.exec_id, node_id=task.node_id,
        model=image.model, ai_system=DEFAULT_AI_SYSTEM, input_tokens=0, output_tokens=CREDITS_PER_IMAGE,
        generation_id=image.generation_id, label=task.label,
    )


def reused_image(row) -> StoredImage:
    """The image an earlier run of this execution generated and stored (its charge key included)."""
    meta = row.metadata_ or {}
    return StoredImage(src=row.output or "", key=meta.get("storageKey", ""), model=meta.get("model", ""),
                       provider=meta.get("provider", ""), generation_id=meta.get("generationId") or row.execId)


def charge_image(main_api: MainApi, task: NodeTask, image: StoredImage) -> NodeOutcome:
    """Charge the generation once (idempotency key); a refused charge is reported, not fatal (§3.5)."""
    charge = image_charge(task, image)
    charged = main_api.charge_tokens(charge)
    return NodeOutcome(task=task, output={"text": image.src}, message="Node executed successfully",
                       extra={"charged": charged, "idempotency_key": charge.idempotency_key})


def run_image_generator(sessions: Sessions, task: NodeTask, *, llm: LlmClient, store: FileStore, main_api: MainApi,
                        generation_id: str) -> NodeOutcome:
    image = generate_and_store(sessions, task, llm=llm, store=store, generation_id=generation_id)
    return charge_image(main_api, task, image)
