"""A loopback callback receiver that fails on purpose: ``script[path]`` lists the replies its next
requests get (then 200); GET serves ``files[path]`` as attachments."""

from __future__ import annotations

from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply


class CallbackReceiver(LoopbackServer):
    def __init__(self):
        self.script: dict[str, list[Reply]] = {}
        self.files: dict[str, bytes] = {}
        super().__init__(self._handle)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def _handle(self, req: Recorded) -> Reply:
        if req.method == "GET":
            if req.path in self.files:
                return Reply(200, self.files[req.path], {"content-type": "text/plain"})
            return Reply(404, {"error": "no such file"})
        replies = self.script.get(req.path)
        if replies:
            return replies.pop(0)
        return Reply(200, {"ok": True})
