"""Audio transcriber (``audioReaderNode``), reference §4.8: an audio file's speech as text, or a
YouTube video's transcript.

- ``type: audio`` (default): ``inputPreview`` is the file's URL. It is downloaded through the
  network guard (loopback/private hosts refused unless ``FLUX_AUDIO_ALLOWED_HOSTS`` allows them)
  under a size cap, and sent to OpenAI's ``whisper-1`` or Groq's whisper models through the openai
  SDK (``aiModel``: ``openAi``, ``groq``, ``groq_v3_turbo``). A file over the providers' upload
  limit (24 MB) is cut by ffmpeg into 600 s segments, re-encoded as 64 kb/s mono MP3 so every
  segment fits that limit whatever the source's bitrate; the segments' transcripts are joined by
  newlines.
- ``type: ytTranscript``: ``youtubeUrl``'s transcript from SearchAPI
  (``engine=youtube_transcripts``, ``SEARCH_API_KEY``, 150 s timeout).

No model-access check and no charge (the original runs neither for this node). Without provider
keys (the embedded default) an offline transcript that says what it is stands in.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

from flux_dagster.errors import (
    ExecutionTimeoutError, ProviderError, SystemError_, UserConfigError, http_errors, provider_error_from_status,
)
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.llm.providers import LlmClient, ProviderCredentials, _openai_client, openai_errors
from flux_dagster.nodes.fields import Sessions, as_text, edge_value
from flux_dagster.nodes.downloads import Source, download
from flux_dagster.services.media_apis import MediaApis

NODE_TYPE = "audioReaderNode"
ALLOWED_HOSTS_ENV = "FLUX_AUDIO_ALLOWED_HOSTS"
MAX_BYTES_ENV = "FLUX_AUDIO_MAX_BYTES"
DEFAULT_MAX_BYTES = 500_000_000
SPLIT_BYTES_ENV = "FLUX_AUDIO_SPLIT_BYTES"
DEFAULT_SPLIT_BYTES = 24 * 1024 * 1024  # under the 25 MB upload limit of OpenAI and Groq
SEGMENT_SECONDS = 600
TRANSCRIBE_TIMEOUT_S = 300.0  # per file or segment: a 24 MB upload plus the model's work
FFMPEG_TIMEOUT_S = 900.0
YOUTUBE_TIMEOUT_S = 150.0
PREVIEWS_KEPT = 10
OFFLINE_LABEL = "[offline transcriber: no provider API key is configured, this is not a real transcript]"

# aiModel (case-insensitive) → (company of llm.providers.PROVIDERS, model)
MODELS: dict[str, tuple[str, str]] = {
    "openai": ("openai", "whisper-1"),
    "groq": ("groq", "whisper-large-v3"),
    "groq_v3_turbo": ("groq", "whisper-large-v3-turbo"),
}
MODES = ("audio", "ytTranscript")
# What the transcription APIs accept, by file name extension (they go by the name, not the bytes).
UPLOAD_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "opus", "wav", "webm")
EXTENSION_BY_CONTENT_TYPE = {
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/m4a": "m4a",
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac", "audio/x-flac": "flac",
    "audio/ogg": "ogg", "audio/opus": "opus", "audio/webm": "webm", "video/mp4": "mp4", "video/webm": "webm",
}


@dataclass(frozen=True)
class Transcript:
    text: str
    provider: str
    model: str
    segments: int = 1
    source_bytes: int | None = None


def _env_int(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name) or default), 1)
    except ValueError:
        return default


def mode_of(data: dict[str, Any]) -> str:
    mode = as_text(data.get("type")).strip() or "audio"
    if mode not in MODES:
        raise UserConfigError(f"Unknown transcriber type {mode!r} (expected audio or ytTranscript).", field="type")
    return mode


def model_of(data: dict[str, Any]) -> tuple[str, str]:
    name = as_text(data.get("aiModel")).strip() or "openAi"
    found = MODELS.get(name.lower())
    if found is None:
        raise UserConfigError(f"Unknown transcription model {name!r} (expected openAi, groq or groq_v3_turbo).",
                              field="aiModel")
    return found


# ----- download --------------------------------------------------------------------------------


AUDIO_FILE = Source(what="audio file", field="inputPreview", allowed_hosts_env=ALLOWED_HOSTS_ENV,
                    max_bytes_env=MAX_BYTES_ENV)


def upload_extension(path: str, content_type: str) -> str | None:
    """The extension the file would be uploaded under, when its name or type says one the APIs take."""
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix in UPLOAD_EXTENSIONS:
        return suffix
    return EXTENSION_BY_CONTENT_TYPE.get(content_type.split(";")[0].strip().lower())


# ----- ffmpeg ----------------------------------------------------------------------------------


def split(source: Path, out_dir: Path, segment_s: int = SEGMENT_SECONDS) -> list[Path]:
    """``segment_s``-second MP3 segments of ``source`` (64 kb/s mono: 4.8 MB per 600 s)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SystemError_("ffmpeg is not installed on this worker; large audio files cannot be split.")
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(source), "-vn", "-ac", "1",
               "-c:a", "libmp3lame", "-b:a", "64k", "-f", "segment", "-segment_time", str(segment_s),
               "-reset_timestamps", "1", str(out_dir / "segment-%04d.mp3")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ExecutionTimeoutError(f"Splitting the audio file took over {FFMPEG_TIMEOUT_S:.0f} s.") from exc
    segments = sorted(out_dir.glob("segment-*.mp3"))
    if done.returncode != 0 or not segments:
        raise UserConfigError("The file is not audio that ffmpeg can read.", field="inputPreview",
                              dev_message=f"ffmpeg exit {done.returncode}: {done.stderr[-1000:]}")
    return segments


# ----- transcription ---------------------------------------------------------------------------


def transcribe_file(path: Path, company: str, model: str, creds: ProviderCredentials) -> str:
    with openai_errors(company), path.open("rb") as audio:
        result = _openai_client(creds.api_key, creds.base_url, TRANSCRIBE_TIMEOUT_S).audio.transcriptions.create(
            model=model, file=audio)
    return (result.text or "").strip()


def offline_transcript(path: Path, model: str) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{OFFLINE_LABEL} model={model} bytes={path.stat().st_size} sha256={digest}"


def transcribe_url(url: str, llm: LlmClient, company: str, model: str) -> Transcript:
    creds = llm.credentials.get(company)
    if creds is None and not llm.offline:
        raise ProviderError(f"No API key is configured for {company} (audio transcription).")
    with tempfile.TemporaryDirectory(prefix="flux-audio-") as tmp:
        source = Path(tmp) / "source"
        downloaded = download(url, source, AUDIO_FILE, max_bytes=_env_int(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))
        extension = upload_extension(downloaded.path, downloaded.content_type)
        if extension and downloaded.size <= _env_int(SPLIT_BYTES_ENV, DEFAULT_SPLIT_BYTES):
            parts = [source.rename(source.with_name(f"audio.{extension}"))]
        else:  # too large for one upload, or a format the APIs would not take: MP3 segments
            segments_dir = Path(tmp) / "segments"
            segments_dir.mkdir()
            parts = split(source, segments_dir)
        if creds is None:
            texts = [offline_transcript(part, model) for part in parts]
            provider = "offline"
        else:
            texts = [transcribe_file(part, company, model, creds) for part in parts]
            provider = company
    return Transcript("\n".join(t for t in texts if t), provider, model, segments=len(parts),
                      source_bytes=downloaded.size)


# ----- YouTube ---------------------------------------------------------------------------------

_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]{6,20}$")


def video_id_of(url_or_id: str) -> str:
    """watch?v=, youtu.be/, /shorts/, /embed/, /live/ URLs, or a bare video id."""
    text = url_or_id.strip()
    if _VIDEO_ID.match(text):
        return text
    parsed = urlparse(text if "://" in text else f"https://{text}")
    host = (parsed.hostname or "").lower()
    candidate = ""
    if host.endswith("youtu.be"):
        candidate = parsed.path.strip("/").split("/")[0]
    elif host.endswith("youtube.com") or host.endswith("youtube-nocookie.com"):
        candidate = (parse_qs(parsed.query).get("v") or [""])[0]
        parts = [p for p in parsed.path.split("/") if p]
        if not candidate and len(parts) >= 2 and parts[0] in ("shorts", "embed", "live", "v"):
            candidate = parts[1]
    if not _VIDEO_ID.match(candidate):
        raise UserConfigError(f"{url_or_id!r} is not a YouTube video URL.", field="youtubeUrl")
    return candidate


def youtube_transcript(url: str, media: MediaApis, offline: bool) -> Transcript:
    video_id = video_id_of(url)
    if media.get("search_api") is None and offline:
        return Transcript(f"{OFFLINE_LABEL} youtube video={video_id}", "offline", "youtube_transcripts")
    creds = media.require("search_api")
    with http_errors("SearchAPI"):
        response = httpx.get(
            f"{creds.base_url.rstrip('/')}/search", params={"engine": "youtube_transcripts", "video_id": video_id},
            headers={"Authorization": f"Bearer {creds.api_key}"}, timeout=YOUTUBE_TIMEOUT_S,
        )
    try:
        body = response.json()
    except ValueError:
        body = {}
    message = body.get("error") if isinstance(body, dict) else None
    if response.status_code >= 400:
        raise provider_error_from_status("SearchAPI", response.status_code, str(message or response.text[:300]))
    snippets = body.get("transcripts") if isinstance(body, dict) else None
    if not snippets:
        raise UserConfigError(f"No transcript is available for the YouTube video {video_id}"
                              + (f": {message}" if message else "."), field="youtubeUrl")
    text = " ".join(as_text(s.get("text")).strip() for s in snippets if isinstance(s, dict)).strip()
    return Transcript(text, "searchapi", "youtube_transcripts", segments=len(snippets))


# ----- the node --------------------------------------------------------------------------------


def transcribe(task: NodeTask, llm: LlmClient, media: MediaApis) -> Transcript:
    data = task.data
    if mode_of(data) == "ytTranscript":
        url = as_text(edge_value(data, "youtubeUrl")).strip()
        if not url:
            raise UserConfigError("The YouTube URL is empty.", field="youtubeUrl")
        return youtube_transcript(url, media, llm.offline)
    url = as_text(edge_value(data, "inputPreview")).strip()
    if not url:
        raise UserConfigError("The audio URL is empty.", field="inputPreview")
    company, model = model_of(data)
    return transcribe_url(url, llm, company, model)


def run_audio_transcriber(sessions: Sessions, task: NodeTask, *, llm: LlmClient, media: MediaApis) -> NodeOutcome:
    transcript = transcribe(task, llm, media)  # no DB transaction is open meanwhile
    previews = [*(task.data.get("previewResponses") or []), transcript.text][-PREVIEWS_KEPT:]
    with sessions() as session:
        persist_node_success(
            session, task, data_updates={"text": transcript.text, "previewResponses": previews},
            output=transcript.text, output_type="text",
            metadata={"provider": transcript.provider, "model": transcript.model, "segments": transcript.segments,
                      "sourceBytes": transcript.source_bytes},
        )
    return NodeOutcome(task=task, output={"text": transcript.text}, message="Node executed successfully",
                       extra={"provider": transcript.provider, "segments": transcript.segments})
