"""Status notifications: the ``room_status_updated`` payload of reference §6, published on Redis
for the main API to relay to the user's socket room, or recorded in ``status_notifications``
(and the run's log) when no Redis is configured."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import StatusNotification
from flux_dagster.execution import ExecutionRequest

STATUSES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")


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

    def publish(self, request: ExecutionRequest, node_id: str, status: str, user_message: str | None = None) -> dict:
        payload = status_payload(request, node_id, status, user_message)
        message = {"event": "room_status_updated", "room": room_of(request.user_id, request.flow_id), "payload": payload}
        if self.redis_url:
            _redis(self.redis_url).publish(self.channel, json.dumps(message))
        else:
            with session_scope(self.database_url) as session:
                session.add(StatusNotification(room=message["room"], exec_id=request.exec_id, payload=payload))
        return message
