"""Image generator (``imageGenerator``), reference §4.9: one image from the node's ``aiSystem``
(:data:`PROVIDERS`: openai and gemini through their official SDKs, fal, Stability and Ideogram
through their HTTP APIs), kept in the file store, its link written to the node, charged (default
1 credit) once per generation, at the moment the original charges for that provider: Stability
before the call, Ideogram after the call, the SDK providers (and fal) after storing.

Two steps, so a retried charge never pays for a second image: :func:`generate_and_store` (which
also makes the before/after-call charges), then :func:`charge_image`; every charge of one
generation carries the same idempotency key, so the second step finds an early charge done.
:func:`run_image_generator` runs both for callers outside a Dagster job. With ``inputPreview``
(an image URL, fetched through the network guard) the providers that can edit an image do
image-to-image. Without the provider's key and no LLM key at all (the embedded default) a small
deterministic PNG that says OFFLINE stands in for the image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from flux_dagster.errors import (
    ExecutionTimeoutError, ProviderError, UserConfigError, http_errors, provider_error_from_status,
)
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.files.render import safe_name
from flux_dagster.files.store import FileStore
from flux_dagster.llm.providers import LlmClient, ProviderCredentials, _openai_client, openai_errors
from flux_dagster.nodes.downloads import Source, download
from flux_dagster.nodes.fields import Sessions, as_text, edge_texts, edge_value
from flux_dagster.services.main_api import MainApi, TokenCharge
from flux_dagster.services.media_apis import MediaApis

NODE_TYPE = "imageGenerator"
DEFAULT_AI_SYSTEM = "openai"
CREDITS_PER_IMAGE = 1
PREVIEWS_KEPT = 10
MAX_DOWNLOAD_BYTES = 50_000_000
KEY_ROOT = "images"
INPUT_IMAGE = Source(what="input image", field="inputPreview", allowed_hosts_env="FLUX_IMAGE_ALLOWED_HOSTS",
                     max_bytes_env="FLUX_IMAGE_INPUT_MAX_BYTES")
DEFAULT_INPUT_MAX_BYTES = 20_000_000

# (label, field) in prompt order; each also read from its ``<field>Data`` edge array.
PROMPT_SECTIONS = (("View", "view"), ("Subject", "subject"), ("Environment", "environment"), ("Tone", "tone"))


@dataclass(frozen=True)
class ImageSpec:
    model: str
    prompt: str
    size: str  # OpenAI's size for the model
    ai_system: str = DEFAULT_AI_SYSTEM
    aspect_ratio: float = 1.0  # width / height asked for
    negative_prompt: str = ""
    input_url: str | None = None  # image-to-image source (inputPreview)
    options: dict[str, Any] = field(default_factory=dict)  # provider fields: fal's sync_mode


@dataclass(frozen=True)
class InputImage:
    content: bytes
    content_type: str


@dataclass(frozen=True)
class GeneratedImage:
    content: bytes
    content_type: str
    provider: str  # the ai_system, or "offline"


@dataclass(frozen=True)
class StoredImage:
    """What the charge step needs: the link, and which generation it pays for."""

    src: str
    key: str
    model: str
    provider: str
    generation_id: str
    ai_system: str = DEFAULT_AI_SYSTEM


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


def ratio_of(aspect_ratio: Any) -> float:
    """``aspectRatio`` ("16:9") as width / height; 1 when it is missing or not a ratio."""
    try:
        width, height = (float(x) for x in str(aspect_ratio).split(":"))
        return width / height if width > 0 and height > 0 else 1.0
    except (ValueError, ZeroDivisionError):
        return 1.0


def closest(ratio: float, choices: dict[str, float]) -> str:
    """The provider's own value whose ratio is nearest the one asked for."""
    return min(choices, key=lambda name: abs(choices[name] - ratio))


def _orientation(aspect_ratio: Any) -> str:
    ratio = ratio_of(aspect_ratio)
    return "landscape" if ratio > 1 else "portrait" if ratio < 1 else "square"


def size_for(model: str, aspect_ratio: Any) -> str:
    """The closest size each model family accepts for the node's ``aspectRatio``."""
    orientation = _orientation(aspect_ratio)
    if model.startswith("dall-e-2") or orientation == "square":
        return "1024x1024"
    if model.startswith("dall-e-3"):
        return "1792x1024" if orientation == "landscape" else "1024x1792"
    return "1536x1024" if orientation == "landscape" else "1024x1536"


def image_spec(data: dict[str, Any]) -> ImageSpec:
    provider = provider_of(data)
    model = as_text(data.get(provider.model_field)).strip() or provider.default_model
    input_url = as_text(edge_value(data, "inputPreview")).strip() or None
    if input_url and not provider.image_to_image:
        raise UserConfigError(f"The image provider {provider.name!r} cannot start from an input image here; "
                              "clear inputPreview or choose gemini, fal, stabilityai or ideogram.", field="inputPreview")
    return ImageSpec(
        model=model, prompt=build_prompt(data), size=size_for(model, data.get("aspectRatio")),
        ai_system=provider.name, aspect_ratio=ratio_of(data.get("aspectRatio")),
        negative_prompt=", ".join(edge_texts(data, "negativePrompt")), input_url=input_url,
        options={k: data[k] for k in ("sync_mode",) if data.get(k) not in (None, "")},
    )


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


def _b64(data: str, provider: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise ProviderError(f"{provider} returned an image that is not valid base64.") from exc


def _download(url: str, timeout_s: float, provider: str) -> bytes:
    """For providers that answer with a link to the image instead of its bytes (the link is theirs)."""
    if url.startswith("data:"):  # fal's sync_mode answers with a data URI
        return _b64(url.split(",", 1)[-1], provider)
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise provider_error_from_status(provider, response.status_code, "downloading the image failed")
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


def _json(response: httpx.Response, provider: str) -> dict[str, Any]:
    """The body of a 2xx answer; any other status as the worker's error (429/5xx retryable)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        detail = response.text[:300]
        if isinstance(body, dict):
            found = next((body[k] for k in ("message", "detail", "error", "errors", "name") if body.get(k)), None)
            detail = (found if isinstance(found, str) else json.dumps(found))[:300] if found else detail
        raise provider_error_from_status(provider, response.status_code, detail)
    if not isinstance(body, dict):
        raise ProviderError(f"{provider} answered with something that is not JSON.")
    return body


# ----- providers: (spec, credentials, timeout, input image or None) → image bytes -----------------


def _openai_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float, source: InputImage | None) -> bytes:
    params: dict[str, Any] = {"model": spec.model, "prompt": spec.prompt, "n": 1, "size": spec.size}
    if spec.model.startswith("dall-e"):  # the GPT image models always answer in base64 and refuse this
        params["response_format"] = "b64_json"
    client = _openai_client(creds.api_key, creds.base_url, timeout_s)
    with openai_errors("openai"):
        if source is None:
            response = client.images.generate(**params)
        else:  # images/edits: dall-e-2 and the GPT image models
            response = client.images.edit(image=("input", source.content, source.content_type), **params)
    item = response.data[0] if response.data else None
    if item is not None and item.b64_json:
        return _b64(item.b64_json, "openai")
    if item is not None and item.url:
        return _download(item.url, timeout_s, "openai")
    raise ProviderError("openai returned no image.")


GEMINI_RATIOS = {r: int(r.split(":")[0]) / int(r.split(":")[1])
                 for r in ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")}


def _gemini_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float, source: InputImage | None) -> bytes:
    """Gemini's native image models (``generateContent`` answering an image part), google-genai SDK."""
    import httpx2
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key=creds.api_key, http_options=types.HttpOptions(
        base_url=creds.base_url, timeout=int(timeout_s * 1000), retry_options=types.HttpRetryOptions(attempts=1)))
    contents: list[Any] = [spec.prompt]
    if source is not None:
        contents.append(types.Part.from_bytes(data=source.content, mime_type=source.content_type))
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio=closest(spec.aspect_ratio, GEMINI_RATIOS)))
    try:
        response = client.models.generate_content(model=spec.model, contents=contents, config=config)
    except errors.APIError as exc:
        raise provider_error_from_status("gemini", exc.code, exc.message or str(exc)) from exc
    except httpx2.TimeoutException as exc:
        raise ExecutionTimeoutError("gemini did not answer in time.") from exc
    except httpx2.TransportError as exc:
        raise ProviderError("gemini could not be reached.", retryable=True) from exc
    for candidate in response.candidates or []:
        for part in (candidate.content.parts if candidate.content else None) or []:
            if part.inline_data is not None and part.inline_data.data:
                return part.inline_data.data
    reason = response.candidates[0].finish_reason if response.candidates else None
    raise ProviderError("gemini returned no image" + (f" (finish reason {reason})." if reason else "."))


FAL_SIZES = {"square_hd": 1.0, "portrait_4_3": 3 / 4, "portrait_16_9": 9 / 16, "landscape_4_3": 4 / 3,
             "landscape_16_9": 16 / 9}


def _fal_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float, source: InputImage | None) -> bytes:
    """fal's synchronous endpoint ``POST {FAL_BASE_URL}/{falModel}``; it fetches ``image_url`` itself."""
    arguments: dict[str, Any] = {"prompt": spec.prompt, "image_size": closest(spec.aspect_ratio, FAL_SIZES),
                                 "num_images": 1, "sync_mode": spec.options.get("sync_mode") in (True, "true", 1)}
    if spec.negative_prompt:
        arguments["negative_prompt"] = spec.negative_prompt
    if spec.input_url:
        arguments["image_url"] = spec.input_url
    with http_errors("fal"):
        response = httpx.post(f"{creds.base_url.rstrip('/')}/{spec.model.strip('/')}", json=arguments,
                              headers={"Authorization": f"Key {creds.api_key}"}, timeout=timeout_s)
    images = _json(response, "fal").get("images") or []
    url = images[0].get("url") if images and isinstance(images[0], dict) else None
    if not url:
        raise ProviderError("fal returned no image.")
    return _download(url, timeout_s, "fal")


STABILITY_SIZES = {f"{w}x{h}": w / h for w, h in ((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640),
                                                 (640, 1536), (768, 1344), (832, 1216), (896, 1152))}


def _stability_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float, source: InputImage | None) -> bytes:
    """Stability's generation API by ``engineId``: ``text-to-image``, or ``image-to-image`` from the input."""
    url = f"{creds.base_url.rstrip('/')}/v1/generation/{spec.model}"
    prompts = [(spec.prompt, 1.0)] + ([(spec.negative_prompt, -1.0)] if spec.negative_prompt else [])
    headers = {"Authorization": f"Bearer {creds.api_key}", "Accept": "application/json"}
    with http_errors("stabilityai"):
        if source is None:
            width, height = (int(x) for x in closest(spec.aspect_ratio, STABILITY_SIZES).split("x"))
            response = httpx.post(f"{url}/text-to-image", headers=headers, timeout=timeout_s, json={
                "text_prompts": [{"text": text, "weight": weight} for text, weight in prompts],
                "width": width, "height": height, "samples": 1, "cfg_scale": 7})
        else:
            form = {"init_image_mode": "IMAGE_STRENGTH", "image_strength": "0.35", "samples": "1", "cfg_scale": "7"}
            for i, (text, weight) in enumerate(prompts):
                form[f"text_prompts[{i}][text]"], form[f"text_prompts[{i}][weight]"] = text, str(weight)
            response = httpx.post(f"{url}/image-to-image", headers=headers, timeout=timeout_s, data=form,
                                  files={"init_image": ("input", source.content, source.content_type)})
    artifacts = _json(response, "stabilityai").get("artifacts") or []
    images = [a for a in artifacts if isinstance(a, dict) and a.get("base64") and a.get("finishReason") != "CONTENT_FILTERED"]
    if not images:
        raise ProviderError("stabilityai returned no image" + (": its content filter removed it." if artifacts else "."))
    return _b64(images[0]["base64"], "stabilityai")


IDEOGRAM_RATIOS = {f"ASPECT_{w}_{h}": w / h for w, h in ((1, 1), (16, 9), (9, 16), (4, 3), (3, 4), (3, 2), (2, 3),
                                                        (16, 10), (10, 16), (3, 1), (1, 3))}


def _ideogram_image(spec: ImageSpec, creds: ProviderCredentials, timeout_s: float, source: InputImage | None) -> bytes:
    """Ideogram's ``/generate`` (JSON ``image_request``), or ``/remix`` (multipart) from the input."""
    if spec.model.upper().startswith("V_3"):
        raise UserConfigError("Ideogram 3.0 models are not supported by this worker (choose V_2, V_2_TURBO, V_2A, "
                              "V_1…).", field="ideogramModel")
    request: dict[str, Any] = {"prompt": spec.prompt, "model": spec.model, "magic_prompt_option": "AUTO",
                               "aspect_ratio": closest(spec.aspect_ratio, IDEOGRAM_RATIOS)}
    if spec.negative_prompt:
        request["negative_prompt"] = spec.negative_prompt
    base, headers = creds.base_url.rstrip("/"), {"Api-Key": creds.api_key}
    with http_errors("ideogram"):
        if source is None:
            response = httpx.post(f"{base}/generate", json={"image_request": request}, headers=headers,
                                  timeout=timeout_s)
        else:
            response = httpx.post(f"{base}/remix", data={"image_request": json.dumps({**request, "image_weight": 50})},
                                  files={"image_file": ("input", source.content, source.content_type)},
                                  headers=headers, timeout=timeout_s)
    data = _json(response, "ideogram").get("data") or []
    first = data[0] if data and isinstance(data[0], dict) else {}
    if not first.get("url"):
        unsafe = first.get("is_image_safe") is False
        raise ProviderError("ideogram returned no image" + (": it judged the image unsafe." if unsafe else "."))
    return _download(first["url"], timeout_s, "ideogram")


# When the original charges each provider (reference §4.9).
CHARGE_BEFORE_CALL, CHARGE_AFTER_CALL, CHARGE_AFTER_STORE = "before_call", "after_call", "after_store"


@dataclass(frozen=True)
class ImageProvider:
    name: str  # aiSystem
    model_field: str
    default_model: str
    key_env: str
    credentials: Callable[[LlmClient, MediaApis], ProviderCredentials | None]
    call: Callable[[ImageSpec, ProviderCredentials, float, InputImage | None], bytes]
    charge_at: str
    image_to_image: bool = True
    fetches_input: bool = False  # the provider downloads inputPreview itself (given the URL)


PROVIDERS: dict[str, ImageProvider] = {p.name: p for p in (
    ImageProvider("openai", "aiModel", "dall-e-3", "OPENAI_API_KEY", lambda llm, media: llm.credentials.get("openai"),
                  _openai_image, CHARGE_AFTER_STORE),
    ImageProvider("gemini", "aiModel", "gemini-2.5-flash-image", "GENAI_API_KEY", lambda llm, media: media.get("gemini"),
                  _gemini_image, CHARGE_AFTER_STORE),
    ImageProvider("fal", "falModel", "fal-ai/flux/schnell", "FAL_KEY", lambda llm, media: media.get("fal"),
                  _fal_image, CHARGE_AFTER_STORE, fetches_input=True),
    ImageProvider("stabilityai", "engineId", "stable-diffusion-xl-1024-v1-0", "STABILITY_API_KEY",
                  lambda llm, media: media.get("stability"), _stability_image, CHARGE_BEFORE_CALL),
    ImageProvider("ideogram", "ideogramModel", "V_2", "IDEOGRAM_API_KEY", lambda llm, media: media.get("ideogram"),
                  _ideogram_image, CHARGE_AFTER_CALL),
)}
NOT_SUPPORTED = {
    "opensources": "The 'opensources' image provider has been removed; choose another provider.",
    "meta": "The image provider 'meta' is not supported by this worker: Meta offers no public image-generation API.",
}


def provider_of(data: dict[str, Any]) -> ImageProvider:
    ai_system = str(data.get("aiSystem") or DEFAULT_AI_SYSTEM).strip().lower()
    if ai_system in NOT_SUPPORTED:
        raise UserConfigError(NOT_SUPPORTED[ai_system], field="aiSystem")
    if ai_system not in PROVIDERS:
        raise UserConfigError(f"The image provider {ai_system!r} is not supported by this worker "
                              f"(supported: {', '.join(PROVIDERS)}).", field="aiSystem")
    return PROVIDERS[ai_system]


def fetch_input(url: str) -> InputImage:
    """``inputPreview``, through the network guard (``FLUX_IMAGE_ALLOWED_HOSTS``) and a size cap."""
    try:
        max_bytes = max(int(os.environ.get(INPUT_IMAGE.max_bytes_env) or DEFAULT_INPUT_MAX_BYTES), 1)
    except ValueError:
        max_bytes = DEFAULT_INPUT_MAX_BYTES
    with tempfile.TemporaryDirectory(prefix="flux-image-") as tmp:
        path = Path(tmp) / "input"
        download(url, path, INPUT_IMAGE, max_bytes=max_bytes)
        content = path.read_bytes()
    try:
        return InputImage(content, _content_type(content)[0])
    except ProviderError as exc:
        raise UserConfigError("The input image (inputPreview) is not a PNG, JPEG, WebP or GIF image.",
                              field="inputPreview") from exc


def generate(spec: ImageSpec, llm: LlmClient, media: MediaApis | None = None,
             charge: Callable[[], Any] = lambda: None) -> GeneratedImage:
    """The image; ``charge`` is called when this provider is charged before or right after the call."""
    provider = PROVIDERS[spec.ai_system]
    creds = provider.credentials(llm, media or MediaApis())
    if creds is None:
        if llm.offline:
            return GeneratedImage(placeholder_png(spec), "image/png", "offline")
        raise ProviderError(f"No API key is configured for {provider.name} ({provider.key_env}).")
    source = fetch_input(spec.input_url) if spec.input_url and not provider.fetches_input else None
    if provider.charge_at == CHARGE_BEFORE_CALL:
        charge()
    content = provider.call(spec, creds, llm.timeout_s, source)
    if provider.charge_at == CHARGE_AFTER_CALL:
        charge()
    return GeneratedImage(content, _content_type(content)[0], provider.name)


def storage_key(task: NodeTask, extension: str) -> str:
    """One key per execution of the node: a retried step overwrites its image."""
    request = task.request
    parts = (safe_name(part) or "_" for part in (request.flow_id, task.node_id, request.exec_id))
    return "/".join((KEY_ROOT, *parts, f"image.{extension}"))


def generate_and_store(sessions: Sessions, task: NodeTask, *, llm: LlmClient, store: FileStore, generation_id: str,
                       main_api: MainApi, media: MediaApis | None = None) -> StoredImage:
    """Generate (charging first or right after for the providers the original charges then),
    store, and write ``text``/previews/``nodeUsedTokens`` to the node."""
    spec = image_spec(task.data)
    charge = image_charge(task, spec.model, spec.ai_system, generation_id)
    # No DB transaction is open while the provider works.
    image = generate(spec, llm, media, charge=lambda: main_api.charge_tokens(charge))
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
            metadata={"model": spec.model, "aiSystem": spec.ai_system, "provider": image.provider,
                      "size": spec.size, "storageKey": stored.key, "credits": CREDITS_PER_IMAGE,
                      "imageToImage": spec.input_url is not None, "generationId": generation_id},
        )
    return StoredImage(src=stored.src, key=stored.key, model=spec.model, provider=image.provider,
                       generation_id=generation_id, ai_system=spec.ai_system)


def image_charge(task: NodeTask, model: str, ai_system: str, generation_id: str) -> TokenCharge:
    request = task.request
    return TokenCharge(
        flow_id=request.flow_id, user_id=request.user_id, exec_id=request.exec_id, node_id=task.node_id,
        model=model, ai_system=ai_system, input_tokens=0, output_tokens=CREDITS_PER_IMAGE,
        generation_id=generation_id, label=task.label,
    )


def reused_image(row) -> StoredImage:
    """The image an earlier run of this execution generated and stored (its charge key included)."""
    meta = row.metadata_ or {}
    return StoredImage(src=row.output or "", key=meta.get("storageKey", ""), model=meta.get("model", ""),
                       provider=meta.get("provider", ""), generation_id=meta.get("generationId") or row.execId,
                       ai_system=meta.get("aiSystem") or DEFAULT_AI_SYSTEM)


def charge_image(main_api: MainApi, task: NodeTask, image: StoredImage) -> NodeOutcome:
    """Charge the generation once (idempotency key: a charge already made before or right after the
    provider's call is found done); a refused charge is reported, not fatal (§3.5)."""
    charge = image_charge(task, image.model, image.ai_system, image.generation_id)
    charged = main_api.charge_tokens(charge)
    return NodeOutcome(task=task, output={"text": image.src}, message="Node executed successfully",
                       extra={"charged": charged, "idempotency_key": charge.idempotency_key})


def run_image_generator(sessions: Sessions, task: NodeTask, *, llm: LlmClient, store: FileStore, main_api: MainApi,
                        generation_id: str, media: MediaApis | None = None) -> NodeOutcome:
    image = generate_and_store(sessions, task, llm=llm, store=store, generation_id=generation_id,
                               main_api=main_api, media=media)
    return charge_image(main_api, task, image)
