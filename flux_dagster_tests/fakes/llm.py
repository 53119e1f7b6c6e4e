"""Loopback LLM servers speaking the OpenAI Chat Completions, OpenAI Responses and Anthropic Messages
wire formats, as JSON or as server-sent event streams (``"stream": true``), the way the real SDKs
expect them.

``failures`` is a queue of HTTP statuses to answer first (429, 500, 400…), then normal answers;
``outage()`` (from the base) fails every request for a while; ``latency_s`` can change at runtime.
What the answer holds is set on the server: ``text`` (streamed in ``chunks`` pieces,
``chunk_delay_s`` apart), token counts, ``reasoning`` (thinking / reasoning summary),
``search_results`` (web search calls and citations when the request asks for the tool, and
Perplexity's ``citations``/``search_results`` under the ``/perplexity`` prefix), and ``usage``
to replace the reported usage object as is (``{}`` = report none).
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply

_ids = itertools.count(1)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class FakeLlm(LoopbackServer):
    def __init__(self, text: str = "Hello from the loopback model.", input_tokens: int = 11,
                 output_tokens: int = 7, latency_s: float = 0.0):
        self._defaults = dict(text=text, input_tokens=input_tokens, output_tokens=output_tokens, latency_s=latency_s)
        self.reset()
        super().__init__(self._handle)

    def generations(self, marker: str) -> list[Recorded]:
        """Completion requests whose body mentions ``marker`` (a prompt names its execution)."""
        return [r for r in self.requests if r.path.endswith(("/chat/completions", "/responses", "/messages"))
                and marker in json.dumps(r.body)]

    def reset(self) -> None:
        """Back to the default answer (one server shared by a module's tests)."""
        for name, value in self._defaults.items():
            setattr(self, name, value)
        self.failures: list[int] = []
        self.retry_after: str | None = None  # Retry-After header sent with each failure
        self.chunks, self.chunk_delay_s = 4, 0.0
        self.reasoning, self.reasoning_tokens = "", 0
        self.search_results: list[tuple[str, str]] = [("https://example.org/a", "Result A"),
                                                      ("https://example.org/b", "Result B")]
        self.usage: dict | None = None

    def pieces(self) -> list[str]:
        size = max(1, -(-len(self.text) // max(self.chunks, 1)))
        return [self.text[i:i + size] for i in range(0, len(self.text), size)] or [""]

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
        body = req.body if isinstance(req.body, dict) else {}
        stream = bool(body.get("stream"))
        if anthropic:
            return self._anthropic(n, body, stream)
        if req.path.endswith("/responses"):
            return self._responses(n, body)
        if req.path.endswith("/chat/completions"):
            return self._chat(n, body, stream, perplexity=req.path.startswith("/perplexity"))
        return Reply(404, {"error": {"message": f"no route {req.path}"}})

    def _paced(self, events: list[bytes], text_from: int, text_to: int) -> list[tuple[float, bytes]]:
        """Events sent in a row, the text pieces ``chunk_delay_s`` apart."""
        return [(self.chunk_delay_s if text_from <= i < text_to else 0.0, e) for i, e in enumerate(events)]

    # --- Chat Completions ---------------------------------------------------------------------

    def _chat_usage(self) -> dict | None:
        if self.usage is not None:
            return self.usage or None
        usage = {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                 "total_tokens": self.input_tokens + self.output_tokens}
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    def _chat(self, n: int, body: dict, stream: bool, perplexity: bool) -> Reply:
        extra = {}
        if perplexity:
            extra = {"citations": [url for url, _ in self.search_results],
                     "search_results": [{"title": title, "url": url, "date": None} for url, title in self.search_results]}
        base = {"id": f"chatcmpl-{n}", "created": int(time.time()), "model": body.get("model")}
        if not stream:
            message = {"role": "assistant", "content": self.text}
            if self.reasoning:
                message["reasoning_content"] = self.reasoning
            return Reply(200, {**base, "object": "chat.completion", **extra,
                               "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                               "usage": self._chat_usage()}, delay_s=self.latency_s)
        chunk = {**base, "object": "chat.completion.chunk", **extra}
        events = [_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})]
        if self.reasoning:
            events.append(_sse({**chunk, "choices": [{"index": 0, "delta": {"reasoning_content": self.reasoning},
                                                      "finish_reason": None}]}))
        first = len(events)
        events += [_sse({**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
                   for p in self.pieces()]
        last = len(events)
        usage = self._chat_usage()
        include_usage = perplexity or (body.get("stream_options") or {}).get("include_usage")
        events.append(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                            **({"usage": usage} if perplexity and usage else {})}))
        if include_usage and usage and not perplexity:
            events.append(_sse({**chunk, "choices": [], "usage": usage}))
        events.append(_sse("[DONE]"))
        return Reply(200, chunks=self._paced(events, first, last), delay_s=self.latency_s)

    # --- Responses API ------------------------------------------------------------------------

    def _responses(self, n: int, body: dict) -> Reply:
        searching = any(t.get("type") == "web_search" for t in body.get("tools") or [])
        output: list[dict] = []
        if self.reasoning:
            output.append({"type": "reasoning", "id": f"rs_{n}", "summary": [{"type": "summary_text", "text": self.reasoning}]})
        if searching:
            output.append({"type": "web_search_call", "id": f"ws_{n}", "status": "completed",
                           "action": {"type": "search", "query": "loopback query",
                                      "sources": [{"type": "url", "url": url} for url, _ in self.search_results]}})
        annotations = [{"type": "url_citation", "url": url, "title": title, "start_index": 0, "end_index": 1}
                       for url, title in (self.search_results if searching else [])]
        output.append({"type": "message", "id": f"msg_{n}", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": self.text, "annotations": annotations}]})
        usage = self.usage if self.usage is not None else {
            "input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens}
        response = {"id": f"resp_{n}", "object": "response", "created_at": int(time.time()), "model": body.get("model"),
                    "status": "completed", "output": output, "usage": usage or None, "incomplete_details": None,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": body.get("tools") or []}
        if not body.get("stream"):
            return Reply(200, response, delay_s=self.latency_s)
        seq = itertools.count()
        events = [_sse({"type": "response.created", "sequence_number": next(seq),
                        "response": {**response, "status": "in_progress", "output": [], "usage": None}},
                       "response.created")]
        first = len(events)
        events += [_sse({"type": "response.output_text.delta", "sequence_number": next(seq), "item_id": f"msg_{n}",
                         "output_index": len(output) - 1, "content_index": 0, "delta": p, "logprobs": []},
                        "response.output_text.delta") for p in self.pieces()]
        last = len(events)
        events.append(_sse({"type": "response.completed", "sequence_number": next(seq), "response": response},
                           "response.completed"))
        return Reply(200, chunks=self._paced(events, first, last), delay_s=self.latency_s)

    # --- Anthropic Messages -------------------------------------------------------------------

    def _anthropic(self, n: int, body: dict, stream: bool) -> Reply:
        searching = [t for t in body.get("tools") or [] if t.get("type") == "web_search_20250305"]
        usage = self.usage if self.usage is not None else {"input_tokens": self.input_tokens,
                                                           "output_tokens": self.output_tokens}
        if searching and self.usage is None:
            usage["server_tool_use"] = {"web_search_requests": 1}
        blocks: list[dict] = []
        if self.reasoning and body.get("thinking"):
            blocks.append({"type": "thinking", "thinking": self.reasoning, "signature": "sig"})
        if searching:
            blocks.append({"type": "server_tool_use", "id": f"srvtoolu_{n}", "name": "web_search",
                           "input": {"query": "loopback query"}})
            blocks.append({"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_{n}",
                           "content": [{"type": "web_search_result", "url": url, "title": title,
                                        "encrypted_content": "enc", "page_age": None}
                                       for url, title in self.search_results]})
        citations = [{"type": "web_search_result_location", "url": url, "title": title, "cited_text": "…",
                      "encrypted_index": "idx"} for url, title in (self.search_results if searching else [])]
        blocks.append({"type": "text", "text": self.text, **({"citations": citations} if citations else {})})
        message = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body.get("model"),
                   "content": blocks, "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
        if not stream:
            return Reply(200, message, delay_s=self.latency_s)
        start_usage = {"input_tokens": usage.get("input_tokens", 0), "output_tokens": 1} if usage else {}
        events = [_sse({"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                             "usage": start_usage}}, "message_start")]
        first = last = 0
        for index, block in enumerate(blocks):
            def event(kind: str, **data) -> bytes:
                return _sse({"type": kind, "index": index, **data}, kind)

            if block["type"] == "thinking":
                events += [event("content_block_start", content_block={"type": "thinking", "thinking": "", "signature": ""}),
                           event("content_block_delta", delta={"type": "thinking_delta", "thinking": block["thinking"]}),
                           event("content_block_delta", delta={"type": "signature_delta", "signature": "sig"})]
            elif block["type"] == "server_tool_use":
                events += [event("content_block_start", content_block={**block, "input": {}}),
                           event("content_block_delta", delta={"type": "input_json_delta",
                                                               "partial_json": json.dumps(block["input"])})]
            elif block["type"] == "web_search_tool_result":
                events.append(event("content_block_start", content_block=block))
            else:
                events.append(event("content_block_start", content_block={"type": "text", "text": "",
                                                                           **({"citations": []} if citations else {})}))
                events += [event("content_block_delta", delta={"type": "citations_delta", "citation": c}) for c in citations]
                first = len(events)
                events += [event("content_block_delta", delta={"type": "text_delta", "text": p}) for p in self.pieces()]
                last = len(events)
            events.append(event("content_block_stop"))
        events.append(_sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {k: v for k, v in usage.items() if k != "input_tokens"} or {"output_tokens": 0}},
                           "message_delta"))
        events.append(_sse({"type": "message_stop"}, "message_stop"))
        return Reply(200, chunks=self._paced(events, first, last), delay_s=self.latency_s)
