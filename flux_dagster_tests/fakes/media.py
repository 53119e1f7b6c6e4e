"""Loopback servers for the media nodes: OpenAI's multipart ``/audio/transcriptions`` (which
reads each uploaded file with ffprobe, so a test sees real audio reach it), SearchAPI's
``youtube_transcripts`` engine, and a plain file host."""

from __future__ import annotations

import mimetypes
import subprocess
import tempfile
from email.parser import BytesParser
from email.policy import HTTP

from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply


def make_audio(path: str, seconds: float, *, bitrate: str = "8k") -> str:
    """Real audio from ffmpeg's sine generator, as MP3 (8 kHz mono: about 1 kB per second)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
                    "-i", f"sine=frequency=440:duration={seconds}:sample_rate=8000", "-ac", "1",
                    "-c:a", "libmp3lame", "-b:a", bitrate, path], check=True, timeout=120)
    return path


def multipart_fields(req: Recorded) -> dict[str, tuple[str | None, bytes]]:
    """name → (filename, content) of a multipart/form-data body."""
    head = f"Content-Type: {req.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + req.raw)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


def audio_seconds(content: bytes) -> float:
    with tempfile.NamedTemporaryFile(suffix=".audio") as f:
        f.write(content)
        f.flush()
        done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", f.name],
                              capture_output=True, text=True, timeout=60)
    return float(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else -1.0


class FakeTranscriptionApi(LoopbackServer):
    """``POST …/audio/transcriptions``: answers "<model>: <n> s of audio" per uploaded file."""

    def __init__(self):
        self.failures: list[int] = []
        self.uploads: list[dict] = []
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        if not req.path.endswith("/audio/transcriptions"):
            return Reply(404, {"error": {"message": f"no route {req.path}"}})
        if self.failures:
            status = self.failures.pop(0)
            return Reply(status, {"error": {"message": f"fake {status}", "type": "fake", "code": str(status)}})
        fields = multipart_fields(req)
        model = fields["model"][1].decode()
        filename, content = fields["file"]
        seconds = audio_seconds(content)
        self.uploads.append({"path": req.path, "model": model, "filename": filename, "bytes": len(content),
                             "seconds": seconds, "authorization": req.headers.get("authorization")})
        if seconds < 0:
            return Reply(400, {"error": {"message": "Invalid file format.", "type": "invalid_request_error"}})
        return Reply(200, {"text": f"{model}: {seconds:.0f} s of audio"})


class FakeSearchApi(LoopbackServer):
    """``GET /api/v1/search?engine=youtube_transcripts&video_id=…`` with a Bearer key."""

    def __init__(self, api_key: str = "search-key"):
        self.api_key = api_key
        self.transcripts: dict[str, list[str]] = {}
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        from urllib.parse import parse_qs, urlparse

        url = urlparse(req.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/api/v1/search" or query.get("engine") != "youtube_transcripts":
            return Reply(404, {"error": "no route"})
        if req.headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, {"error": "Invalid API key."})
        texts = self.transcripts.get(query.get("video_id", ""))
        if texts is None:
            return Reply(200, {"search_parameters": query, "error": "No transcripts found for this video."})
        return Reply(200, {"search_parameters": query, "transcripts": [
            {"text": text, "start": float(i), "duration": 1.0} for i, text in enumerate(texts)]})


class FileHost(LoopbackServer):
    """Serves ``files[path]`` as bytes; ``redirects[path]`` answers 302 to another path."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        super().__init__(self._handle)

    def _handle(self, req: Recorded) -> Reply:
        if req.path in self.redirects:
            return Reply(302, b"", headers={"location": self.redirects[req.path]})
        if req.path not in self.files:
            return Reply(404, b"not found", headers={"content-type": "text/plain"})
        content_type = mimetypes.guess_type(req.path)[0] or "application/octet-stream"
        return Reply(200, self.files[req.path], headers={"content-type": content_type})
