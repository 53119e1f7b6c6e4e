"""No duplicate emails (reference §2.3): two Redis keys per email,

- ``email-sent:<flowId>:<nodeId>:<runLogProcessId>`` kept 24 h after the send,
- ``email-content:<flowId>:<nodeId>:<contentHash>`` kept 90 s after the send,

claimed by the email's delivery id (``pending:<owner>``, 300 s), sent, then confirmed
(``sent:<owner>``); released when the send fails, so a retry is never taken for a duplicate. A
key another owner holds or sent suppresses the send. The owner is the delivery id, stable across
retries and re-executions: a claim left by a killed attempt is this delivery's own and is taken
again, and an email this delivery already confirmed is not sent twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

from flux_dagster.delivery.plan import Email

SENT_TTL_S = 24 * 3600
CONTENT_TTL_S = 90
CLAIM_TTL_S = 300

# Atomic on the server: take a free key or our own claim; report who holds it otherwise.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if (not held) or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 'claimed'
end
return held
"""
# Delete only our own claim, never another owner's key or a confirmed send.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def content_hash(email: Email) -> str:
    fields = email.model_dump(include={"to", "cc", "bcc", "subject", "text", "html", "attachments"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)


@dataclass(frozen=True)
class EmailClaim:
    """``claimed``: send it; ``already_sent``: this delivery sent it before; ``duplicate``: another
    delivery holds or sent it."""

    state: str
    keys: tuple[str, ...] = ()


@dataclass
class EmailDedup:
    redis_url: str

    def keys(self, flow_id: str, node_id: str, scope: str, email: Email) -> tuple[tuple[str, int], ...]:
        return ((f"email-sent:{flow_id}:{node_id}:{scope}", SENT_TTL_S),
                (f"email-content:{flow_id}:{node_id}:{content_hash(email)}", CONTENT_TTL_S))

    def claim(self, owner: str, keys: tuple[tuple[str, int], ...]) -> EmailClaim:
        client = _redis(self.redis_url)
        claimed: list[str] = []
        for key, _ttl in keys:
            held = client.eval(_CLAIM, 1, key, f"pending:{owner}", CLAIM_TTL_S)
            if held == "claimed":
                claimed.append(key)
                continue
            self.release(owner, tuple(claimed))
            return EmailClaim("already_sent" if held == f"sent:{owner}" else "duplicate")
        return EmailClaim("claimed", tuple(claimed))

    def confirm(self, owner: str, keys: tuple[tuple[str, int], ...]) -> None:
        pipe = _redis(self.redis_url).pipeline()
        for key, ttl in keys:
            pipe.set(key, f"sent:{owner}", ex=ttl)
        pipe.execute()

    def release(self, owner: str, claimed: tuple[str, ...]) -> None:
        client = _redis(self.redis_url)
        for key in claimed:
            client.eval(_RELEASE, 1, key, f"pending:{owner}")
