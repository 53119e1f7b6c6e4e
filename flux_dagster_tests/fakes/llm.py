"""Loopback LLM servers speaking the OpenAI Chat Completions and Anthropic Messages wire formats.

``failures`` is a queue of HTTP statuses to answer first (429, 500, 400…), then normal answers.
"""

from __future__ import annotations

import itertools
import time

from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply

_ids = itertools.count(1)


class FakeLlm(LoopbackServer):
    def __init__(self, text: str = "Hello from the loopback model.", input_tokens: int = 11,
                 output_tokens: int = 7, latency_s: float = 0.0):
        self.text, self.input_tokens, self.output_tokens, self.latency_s = text, input_tokens, output_tokens, latency_s
        self.failures: list[int] = []
        self.retry_after: str | None = None  # Retry-After header sent with each failure
        self.omit_usage = False  # answer like a provider that reports no token usage
        super().__init__(self._handle)

    def _error(self, status: int, anthropic: bool) -> Reply:
        headers = {"retry-after": self.retry_after} if self.retry_after else {}
        if anthropic:
            kind = {429: "rate_limit_error", 400: "invalid_request_error", 401: "authentication_error"}.get(status, "api_error")
            return Reply(status, {"type": "error", "error": {"type": kind, "message": f"fake {status}"}}, headers=headers)
        return Reply(status, {"error": {"message": f"fake {status}", "type": "fake", "code": str(status)}},
                     headers=headers)

    def _handle(self, req: Recorded) -> Reply:
        anthropic = req.path.endswith("/messages")
        if self.failures:
            return self._error(self.failures.pop(0), anthropic)
        n = next(_ids)
        if anthropic:
            return Reply(200, {
                "id": f"msg_{n}", "type": "message", "role": "assistant", "model": req.body["model"],
                "content": [{"type": "text", "text": self.text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            }, delay_s=self.latency_s)
        if req.path.endswith("/chat/completions"):
            usage = None if self.omit_usage else {
                "prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens}
            return Reply(200, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": req.body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.text}}],
                "usage": usage,
            }, delay_s=self.latency_s)
        return Reply(404, {"error": {"message": f"no route {req.path}"}})
