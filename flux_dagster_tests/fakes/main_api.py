"""A loopback main API for ``/worker/*``: checks the ``internal-api-key`` header, records calls."""

from __future__ import annotations

from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply


class FakeMainApi(LoopbackServer):
    def __init__(self, api_key: str = "test-internal-key"):
        self.api_key = api_key
        self.denied_models: set[str] = set()
        self.charge_failures: list[int] = []
        self.charges: dict[str, dict] = {}  # by idempotency key, as a deduplicating back would keep them
        self.accepted: list[dict] = []  # every charge answered 200, duplicates included
        super().__init__(self._handle)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def keys_by_execution(self) -> dict[str, set[str]]:
        """Distinct idempotency keys charged per execution: more than one is a double charge even
        for a back that deduplicates by key."""
        keys: dict[str, set[str]] = {}
        for body in self.charges.values():
            keys.setdefault(body["execId"], set()).add(body["idempotencyKey"])
        return keys

    def _handle(self, req: Recorded) -> Reply:
        if req.headers.get("internal-api-key") != self.api_key:
            return Reply(401, {"success": False, "message": "bad internal-api-key"})
        if req.path == "/worker/validate-model-access":
            if req.body["model"] in self.denied_models:
                return Reply(403, {"success": False, "message": f"No access to {req.body['model']}"})
            return Reply(200, {"success": True, "message": "ok"})
        if req.path == "/worker/charge-tokens":
            if self.charge_failures:
                return Reply(self.charge_failures.pop(0), {"success": False, "message": "billing down"})
            self.charges.setdefault(req.body["idempotencyKey"], req.body)
            self.accepted.append(req.body)
            return Reply(200, {"success": True, "message": "charged", "tokens": req.body["usedTokens"]})
        if req.path == "/worker/delivery-outcome":
            return Reply(200, {"success": True})
        return Reply(404, {"success": False, "message": "no route"})
