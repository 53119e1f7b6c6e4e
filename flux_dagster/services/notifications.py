"""Status notifications: the ``room_status_updated`` payload of reference §6, published on Redis
for the main API to relay to the user's socket room, or recorded in ``status_notifications``
when no Redis is configured. With Redis configured, that table is also the outbox of statuses
that could not be published yet (see ``Notifier``)."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import StatusNotification, utcnow
from flux_dagster.execution import ExecutionRequest

log = logging.getLogger(__name__)

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


def _message(room: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"event": "room_status_updated", "room": room, "payload": payload}


@dataclass
class Notifier:
    """Publishes statuses without ever failing an execution over Redis: a status that cannot be
    published now is kept in ``status_notifications`` (the outbox) and published by
    :func:`flush_outbox` once Redis is back; while an execution has statuses waiting there, its
    newer ones wait behind them, so each node's statuses arrive in order."""

    database_url: str
    redis_url: str | None = None
    channel: str = "room_status_updated"
    stream_channel: str = STREAM_EVENT

    def publish(self, request: ExecutionRequest, node_id: str, status: str, user_message: str | None = None) -> dict:
        payload = status_payload(request, node_id, status, user_message)
        room = room_of(request.user_id, request.flow_id)
        message = _message(room, payload)
        if self.redis_url and not self._waiting(request.exec_id):
            try:
                _redis(self.redis_url).publish(self.channel, json.dumps(message))
                return message
            except Exception as exc:  # noqa: BLE001 - any Redis trouble: keep it for later
                log.warning("status %s of %s/%s kept for later: Redis unavailable (%s)",
                            status, request.exec_id, node_id, exc)
        with session_scope(self.database_url) as session:
            session.add(StatusNotification(
                room=room, exec_id=request.exec_id, node_id=node_id, status=status, payload=payload,
                # Without Redis the table is the transport: recorded is delivered.
                published_at=None if self.redis_url else utcnow(),
            ))
        return message

    def _waiting(self, exec_id: str) -> bool:
        with session_scope(self.database_url) as session:
            return session.scalar(
                select(StatusNotification.id)
                .where(StatusNotification.exec_id == exec_id, StatusNotification.published_at.is_(None))
                .limit(1)
            ) is not None

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


def flush_outbox(database_url: str, redis_url: str, channel: str, limit: int = 500) -> int:
    """Publish kept statuses oldest first; stops at the first one Redis refuses. Returns how many."""
    client = _redis(redis_url)
    published = 0
    with session_scope(database_url) as session:
        rows = session.scalars(
            select(StatusNotification).where(StatusNotification.published_at.is_(None))
            .order_by(StatusNotification.id).limit(limit)
        ).all()
        for row in rows:
            try:
                client.publish(channel, json.dumps(_message(row.room, row.payload)))
            except Exception as exc:  # noqa: BLE001 - still away: the rest waits, in order
                log.warning("status outbox: Redis still unavailable (%s); %d waiting", exc, len(rows) - published)
                break
            row.published_at = utcnow()
            published += 1
    return published
