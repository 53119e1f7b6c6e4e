"""A tiny loopback HTTP server base for wire-protocol fakes: runs in a thread, records requests."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterable
from typing import Any, Callable


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes = b""  # the body as sent (multipart uploads, binary)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    # A streamed body (server-sent events): (pause before, bytes) pieces, the connection closed after.
    chunks: Iterable[tuple[float, bytes]] | None = None


@dataclass
class Outage:
    """Until ``until`` (monotonic): answer ``status`` (with ``headers``), or with ``status`` None
    refuse connections (the listening socket is closed, open connections are dropped)."""

    until: float
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class LoopbackServer:
    """``handle(recorded) -> Reply`` decides each answer; ``requests`` keeps what came in.
    ``outage()`` switches a fault mode on at runtime, for a while or for good."""

    def __init__(self, handle: Callable[[Recorded], Reply]):
        self.handle = handle
        self.requests: list[Recorded] = []
        self.outage_state: Outage | None = None
        self._listen_lock = threading.Lock()
        self.closed_streams = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                recorded = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, raw)
                outage = outer.current_outage()
                if outage is not None and outage.status is None:
                    self.close_connection = True  # a server that is down: the connection just ends
                    return
                outer.requests.append(recorded)
                if outage is not None:
                    reply = Reply(outage.status, {"error": {"message": f"fake outage {outage.status}"}}, outage.headers)
                else:
                    reply = outer.handle(recorded)
                if reply.delay_s:
                    threading.Event().wait(reply.delay_s)
                if reply.chunks is not None:
                    self._stream(reply)
                    return
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                headers = {"content-type": "application/json", **reply.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self, reply: Reply) -> None:
                self.send_response(reply.status)
                for k, v in {"content-type": "text/event-stream", **reply.headers}.items():
                    self.send_header(k, v)
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for pause, piece in reply.chunks:
                        if pause:
                            threading.Event().wait(pause)
                        self.wfile.write(piece)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client closed the stream
                    outer.closed_streams += 1

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, *args):  # keep test output clean
                pass

        self._handler = Handler
        self.port = 0
        self._bind()

    def _bind(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._listen_lock:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
                self.server = None

    def current_outage(self) -> Outage | None:
        outage = self.outage_state
        if outage is None or time.monotonic() >= outage.until:
            return None
        return outage

    def outage(self, seconds: float, status: int | None = None, headers: dict[str, str] | None = None) -> None:
        """Refuse connections (``status`` None) or answer ``status`` for ``seconds`` (inf: for good)."""
        self.outage_state = Outage(time.monotonic() + seconds, status, headers or {})
        if status is None:
            with self._listen_lock:
                self.server.shutdown()
                self.server.server_close()
            if seconds != float("inf"):
                threading.Timer(seconds, self._listen_again).start()

    def _listen_again(self) -> None:
        with self._listen_lock:
            if self.server is None:
                return
            self._bind()
            self.thread.start()
