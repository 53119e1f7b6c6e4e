"""One loopback server speaking the image providers' wire formats, each under its own base URL:
Gemini ``…/models/{model}:generateContent`` (root), fal's synchronous ``/fal/{model}``,
Stability ``/stability/v1/generation/{engine}/{text-to-image|image-to-image}``, Ideogram
``/ideogram/{generate|remix}``; fal and Ideogram answer with links served under ``/files/``."""

from __future__ import annotations

import base64
import re

from flux_dagster.nodes import image_generator as ig
from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply
from flux_dagster_tests.fakes.media import multipart_fields

KEYS = {"gemini": "gk-test", "fal": "fal-test", "stabilityai": "sk-stab", "ideogram": "ide-test"}
BASE_PATHS = {"gemini": "", "fal": "/fal", "stabilityai": "/stability", "ideogram": "/ideogram"}


def image_of(provider: str) -> bytes:
    return ig.placeholder_png(ig.ImageSpec(provider, provider, "1x1"), word="FILE")


class FakeImageProviders(LoopbackServer):
    def __init__(self):
        self.failures: dict[str, list[int]] = {}
        self.calls: list[tuple[str, Recorded]] = []  # (provider, request), files excluded
        self.events: list[str] | None = None  # shared with a main API fake to check charge timing
        super().__init__(self._handle)

    def base_url(self, provider: str) -> str:
        return self.url + BASE_PATHS[provider]

    def calls_of(self, provider: str) -> list[Recorded]:
        return [r for p, r in self.calls if p == provider]

    def _provider(self, path: str) -> str | None:
        if ":generateContent" in path:
            return "gemini"
        return next((p for p, prefix in BASE_PATHS.items() if prefix and path.startswith(prefix + "/")), None)

    def _authorized(self, provider: str, req: Recorded) -> bool:
        expected = {"gemini": ("x-goog-api-key", KEYS["gemini"]), "fal": ("authorization", f"Key {KEYS['fal']}"),
                    "stabilityai": ("authorization", f"Bearer {KEYS['stabilityai']}"),
                    "ideogram": ("api-key", KEYS["ideogram"])}[provider]
        return req.headers.get(expected[0]) == expected[1]

    def _handle(self, req: Recorded) -> Reply:
        if req.path.startswith("/files/"):
            provider = req.path.removeprefix("/files/").split(".")[0]
            return Reply(200, image_of(provider), headers={"content-type": "image/png"})
        provider = self._provider(req.path)
        if provider is None:
            return Reply(404, {"error": {"message": f"no route {req.path}"}})
        self.calls.append((provider, req))
        if self.events is not None:
            self.events.append(f"call {provider}")
        if not self._authorized(provider, req):
            return Reply(401, {"message": "bad key", "error": {"code": 401, "message": "bad key", "status": "UNAUTHENTICATED"}})
        pending = self.failures.get(provider) or []
        if pending:
            status = pending.pop(0)
            return Reply(status, {"message": f"fake {status}",
                                  "error": {"code": status, "message": f"fake {status}", "status": "FAKE"}})
        image = base64.b64encode(image_of(provider)).decode()
        if provider == "gemini":
            return Reply(200, {"candidates": [{"content": {"role": "model", "parts": [
                {"text": "Here it is."}, {"inlineData": {"mimeType": "image/png", "data": image}}]},
                "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1290}})
        if provider == "fal":
            url = f"data:image/png;base64,{image}" if req.body.get("sync_mode") else f"{self.url}/files/fal.png"
            return Reply(200, {"images": [{"url": url, "content_type": "image/png", "width": 1, "height": 1}],
                               "seed": 1, "has_nsfw_concepts": [False], "prompt": req.body["prompt"]})
        if provider == "stabilityai":
            if not re.search(r"/v1/generation/[^/]+/(text-to-image|image-to-image)$", req.path):
                return Reply(404, {"name": "not_found", "message": "no such engine route"})
            return Reply(200, {"artifacts": [{"base64": image, "seed": 1, "finishReason": "SUCCESS"}]})
        return Reply(200, {"created": "2026-12-01T00:00:00Z", "data": [{
            "url": f"{self.url}/files/ideogram.png", "prompt": "p", "resolution": "1024x1024",
            "is_image_safe": True, "seed": 1}]})

    def multipart(self, req: Recorded) -> dict[str, tuple[str | None, bytes]]:
        return multipart_fields(req)
