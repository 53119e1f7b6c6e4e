"""A loopback AWS Lambda for the two code executors: the real Invoke wire protocol (rest-json,
``POST /2015-03-31/functions/{name}/invocations?Qualifier=``, ``X-Amz-Function-Error`` on function
errors, ``x-amzn-ErrorType`` on API errors), running each script for real in the local sandbox."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote

from flux_dagster.scripting import JAVASCRIPT, PYTHON
from flux_dagster.scripting.sandbox import LocalSandboxRunner
from flux_dagster_tests.fakes.http import LoopbackServer, Recorded, Reply

FUNCTIONS = {"code-executor-python": PYTHON, "code-executor-js": JAVASCRIPT}
_INVOKE = re.compile(r"/2015-03-31/functions/([^/?]+)/invocations(?:\?(.*))?")
ARN = "arn:aws:lambda:us-east-1:000000000000:function:"


def api_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"Type": "User" if status < 500 else "Service", "message": message},
                 headers={"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazonaws.awslambda/"})


def function_error(error_type: str, message: str) -> Reply:
    """What Lambda answers when the function itself failed: 200, the error document, the header."""
    return Reply(200, {"errorType": error_type, "errorMessage": message, "stackTrace": []},
                 headers={"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "1"})


class FakeLambda(LoopbackServer):
    def __init__(self, python_aliases: tuple[str, ...] = ("non-prod",), timeout_s: float = 5.0):
        self.python_aliases = set(python_aliases)
        self.runner = LocalSandboxRunner(timeout_s=timeout_s)
        self.failures: list[Reply] = []  # each answers one invoke, before any script runs
        super().__init__(self._handle)

    @property
    def invocations(self) -> list[Recorded]:
        return [r for r in self.requests if _INVOKE.fullmatch(r.path)]

    def _handle(self, req: Recorded) -> Reply:
        match = _INVOKE.fullmatch(req.path)
        if req.method != "POST" or match is None:
            return api_error(404, "UnknownOperationException", f"Unknown operation {req.method} {req.path}")
        if not req.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return api_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        name = unquote(match.group(1))
        qualifier = parse_qs(match.group(2) or "").get("Qualifier", [None])[0]
        if self.failures:
            return self.failures.pop(0)
        language = FUNCTIONS.get(name)
        known = self.python_aliases if language == PYTHON else {None, "$LATEST"}
        if language is None or qualifier not in known:
            return api_error(404, "ResourceNotFoundException",
                             f"Function not found: {ARN}{name}" + (f":{qualifier}" if qualifier else ""))
        if req.headers.get("x-amz-invocation-type", "RequestResponse") != "RequestResponse":
            return api_error(400, "InvalidParameterValueException", "Only RequestResponse is faked")
        event = req.body
        response = self.runner.run(language, event["script"], event.get("variables") or [])
        return Reply(200, {"result": response.result, "console": list(response.console), "error": response.error},
                     headers={"X-Amz-Executed-Version": "1"})
