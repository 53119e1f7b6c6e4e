"""A real MCP server on loopback, built with the same SDK the worker's client uses (FastMCP),
served by uvicorn in a thread over streamable HTTP (``/mcp``) or the older SSE transport
(``/sse``). Requires ``Authorization: Bearer <token>`` when ``token`` is set."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from mcp.server.fastmcp import FastMCP


def build_server(calls: list[tuple[str, dict]]) -> FastMCP:
    server = FastMCP("flux-test-tools")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", {"a": a, "b": b}))
        return a + b

    @server.tool()
    def shout(text: str) -> str:
        """Say the text in capitals."""
        calls.append(("shout", {"text": text}))
        return text.upper()

    @server.tool()
    def lorem(size: int) -> str:
        """Return ``size`` characters of text."""
        calls.append(("lorem", {"size": size}))
        return ("lorem ipsum " * (size // 12 + 1))[:size]

    @server.tool()
    def explode(reason: str) -> str:
        """Always fails."""
        calls.append(("explode", {"reason": reason}))
        raise RuntimeError(f"exploded: {reason}")

    return server


class McpServer:
    def __init__(self, transport: str = "streamable-http", token: str | None = None):
        self.transport, self.token = transport, token
        self.calls: list[tuple[str, dict]] = []
        self.authorizations: list[str | None] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        mcp = build_server(self.calls)
        app = mcp.streamable_http_app() if transport == "streamable-http" else mcp.sse_app()
        outer = self

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                auth = dict(scope["headers"]).get(b"authorization")
                outer.authorizations.append(auth.decode() if auth else None)
                if outer.token and auth != f"Bearer {outer.token}".encode():
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"unauthorized"})
                    return
            await app(scope, receive, send)

        self.server = uvicorn.Server(uvicorn.Config(guarded, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        path = "/mcp" if self.transport == "streamable-http" else "/sse"
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> McpServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "MCP server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
