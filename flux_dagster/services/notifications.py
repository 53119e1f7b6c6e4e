"""Status notifications: the ``room_status_updated`` payload of reference §6, published on Redis
for the main API to relay to the user's socket room, or recorded in ``status_notifications``
(and the run's log) when no Redis is configured."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import StatusNotification
from flux_dagster.execution import ExecutionRequest

STATUSES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
STREAM_EVENT = "node_output_stream"
# At most this many streamed messages a second per node (the final one is always sent).
STREAM_MAX_PER_S = 20

log = logging.getLogger(__name__)


def room_of(user_id: str, flow_id: str) -> str:
    return f"room_user_{user_id}_flow_{flow_id}"


def status_payload(
    request: ExecutionRequest, node_id: str, status: str, user_message: str | None = None
) -> dict[str, Any]:
    assert status in STATUSES, status
    node_status: dict[str, Any] = {"status": status}
    if user_message:
        node_status["userMessage"] = user_message
        node_status["message"] = user_message
    return {
        "userId": request.user_id,
        "flowId": request.flow_id,
        "nodes": {node_id: node_status},
        "execId": request.exec_id,
        "flowVersionHistoryId": request.flow_version_history_id,
        "runId": request.run_id or "",
    }


@functools.lru_cache(maxsize=4)
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@dataclass
class Notifier:
    database_url: str
    redis_url: str | None = None
    channel: str = "room_status_updated"
    stream_channel: str = STREAM_EVENT

    def publish(self, request: ExecutionRequest, node_id: str, status: str, user_message: str | None = None) -> dict:
        payload = status_payload(request, node_id, status, user_message)
        message = {"event": "room_status_updated", "room": room_of(request.user_id, request.flow_id), "payload": payload}
        if self.redis_url:
            _redis(self.redis_url).publish(self.channel, json.dumps(message))
        else:
            with session_scope(self.database_url) as session:
                session.add(StatusNotification(room=message["room"], exec_id=request.exec_id, payload=payload))
        return message

    def publish_stream(self, request: ExecutionRequest, node_id: str, payload: dict[str, Any]) -> None:
        """One message of a node's streamed answer, on ``stream_channel``, for ``request.socket_id``.
        Only over Redis: without it there is no client to stream to (the answer is persisted anyway)."""
        if not self.redis_url:
            return
        message = {"event": STREAM_EVENT, "room": room_of(request.user_id, request.flow_id),
                   "socketId": request.socket_id,
                   "payload": {"userId": request.user_id, "flowId": request.flow_id, "nodeId": node_id,
                               "execId": request.exec_id, "runId": request.run_id or "",
                               "flowVersionHistoryId": request.flow_version_history_id, **payload}}
        _redis(self.redis_url).publish(self.stream_channel, json.dumps(message))


@dataclass
class StreamPublisher:
    """A node's growing answer to its socket: the whole text so far in each message (a lost message
    loses nothing), at most ``STREAM_MAX_PER_S`` a second, then one final message. Publishing is
    best effort: a Redis failure stops the stream's messages, never the generation."""

    notifier: Notifier
    request: ExecutionRequest
    node_id: str
    min_interval_s: float = 1.0 / STREAM_MAX_PER_S
    seq: int = 0
    _last_sent: float = float("-inf")
    _failed: bool = False
    _clock: Any = field(default=time.monotonic, repr=False)

    def _send(self, payload: dict[str, Any]) -> None:
        if self._failed:
            return
        self.seq += 1
        try:
            self.notifier.publish_stream(self.request, self.node_id, {"seq": self.seq, **payload})
        except Exception:
            self._failed = True
            log.warning("Streaming to socket %s stopped: publishing failed", self.request.socket_id, exc_info=True)

    def update(self, text: str) -> None:
        now = self._clock()
        if now - self._last_sent >= self.min_interval_s:
            self._last_sent = now
            self._send({"text": text, "done": False})

    def finish(self, text: str, status: str, input_tokens: int, output_tokens: int) -> None:
        self._send({"text": text, "done": True, "status": status,
                    "tokens": {"input": input_tokens, "output": output_tokens}})
