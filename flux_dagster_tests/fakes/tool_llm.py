"""The loopback LLM, answering tool-calling requests (OpenAI ``tools``/``tool_calls``, Anthropic
``tools``/``tool_use``) with the next planned call, else the first tool with ``default_arguments``."""

from __future__ import annotations

import json

from flux_dagster_tests.fakes.http import Recorded, Reply
from flux_dagster_tests.fakes.llm import FakeLlm


class FakeToolLlm(FakeLlm):
    def __init__(self, **kw):
        self.planned: list[tuple[str, dict]] = []  # (tool name, arguments) to answer, in order
        self.default_arguments: dict = {}
        super().__init__(**kw)

    def tool_requests(self) -> list[Recorded]:
        return [r for r in self.requests if isinstance(r.body, dict) and r.body.get("tools")]

    def _handle(self, req: Recorded) -> Reply:
        if not (isinstance(req.body, dict) and req.body.get("tools")) or self.failures:
            return super()._handle(req)
        anthropic = req.path.endswith("/messages")
        names = [t["name"] if anthropic else t["function"]["name"] for t in req.body["tools"]]
        name, arguments = self.planned.pop(0) if self.planned else (names[0], self.default_arguments)
        usage_in, usage_out = self.input_tokens, self.output_tokens
        if anthropic:
            return Reply(200, {
                "id": "msg_tool", "type": "message", "role": "assistant", "model": req.body["model"],
                "content": [{"type": "tool_use", "id": "toolu_1", "name": name, "input": arguments}],
                "stop_reason": "tool_use", "stop_sequence": None,
                "usage": {"input_tokens": usage_in, "output_tokens": usage_out},
            })
        return Reply(200, {
            "id": "chatcmpl-tool", "object": "chat.completion", "created": 1, "model": req.body["model"],
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": name, "arguments": json.dumps(arguments)}}]}}],
            "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                      "total_tokens": usage_in + usage_out},
        })
