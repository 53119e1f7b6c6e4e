"""The production script runner: the code-executor Lambdas through boto3 (reference §4.2).

Failures map to the error classes: the script's own ``error``, a Lambda timeout, out-of-memory or
a killed runtime are the script's fault (a response with ``error``, never retried); throttling,
5xx and lost connections are retryable; a missing function, refused credentials or a broken
executor are not.
"""

from __future__ import annotations

import json
from typing import Any

from flux_dagster.errors import ExecutionTimeoutError, ProviderError, SystemError_, provider_error_from_status
from flux_dagster.scripting import PYTHON, ScriptResponse

PYTHON_FUNCTION = "code-executor-python"
JS_FUNCTION = "code-executor-js"
DEFAULT_REGION = "us-east-1"

# FunctionError types that the script caused: its time or memory ran out, or it killed the runtime.
_SCRIPT_FAULTS = {
    "Sandbox.Timedout": "The script exceeded the executor's time limit",
    "Runtime.OutOfMemory": "The script ran out of memory",
    "Runtime.ExitError": "The script ended the executor's runtime",
}


class LambdaRunner:
    name = "lambda"

    def __init__(self, *, python_alias: str | None, endpoint_url: str | None = None, region: str = DEFAULT_REGION,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 session_token: str | None = None, python_function: str = PYTHON_FUNCTION,
                 js_function: str = JS_FUNCTION, read_timeout_s: float = 90.0):
        self.python_alias = python_alias
        self.endpoint_url = endpoint_url
        self.region = region
        self.credentials = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
                            "aws_session_token": session_token}
        self.python_function = python_function
        self.js_function = js_function
        self.read_timeout_s = read_timeout_s

    def _client(self):
        import boto3  # heavy: imported only when a script goes to Lambda
        from botocore.config import Config

        return boto3.session.Session().client(
            "lambda", region_name=self.region, endpoint_url=self.endpoint_url,
            **{k: v for k, v in self.credentials.items() if v},
            # One attempt: retries are the op's RetryPolicy, and an invoke re-runs the script.
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=self.read_timeout_s),
        )

    def run(self, language: str, script: str, variables: list[dict[str, Any]]) -> ScriptResponse:
        from botocore import exceptions as boto

        if language == PYTHON:
            if not self.python_alias:  # the original fails closed rather than run an unpinned version
                raise SystemError_("The Python script executor is not configured.",
                                   dev_message="LAMBDA_PYTHON_ALIAS is not set")
            target = {"FunctionName": self.python_function, "Qualifier": self.python_alias}
        else:
            target = {"FunctionName": self.js_function}
        event = json.dumps({"script": script, "variables": variables}, default=str).encode()
        try:
            response = self._client().invoke(InvocationType="RequestResponse", Payload=event, **target)
            body = response["Payload"].read()
        except boto.ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise provider_error_from_status(
                "AWS Lambda", status, f"{error.get('Code', 'Error')}: {error.get('Message', '')}"
            ) from exc
        except (boto.ConnectTimeoutError, boto.ReadTimeoutError) as exc:
            raise ExecutionTimeoutError(f"AWS Lambda did not answer in time: {exc}") from exc
        except (boto.ConnectionError, boto.HTTPClientError) as exc:
            raise provider_error_from_status("AWS Lambda", None, str(exc)) from exc
        except boto.BotoCoreError as exc:  # no credentials, bad configuration
            raise SystemError_("The script executor is misconfigured.",
                               dev_message=f"{type(exc).__name__}: {exc}") from exc
        try:
            payload = json.loads(body) if body else None
        except ValueError as exc:
            raise ProviderError("The script executor answered with something that is not JSON.",
                                dev_message=body[:2000].decode("utf-8", "replace")) from exc
        if response.get("FunctionError"):
            return _function_error(payload)
        return ScriptResponse.from_payload(payload)


def _function_error(payload: Any) -> ScriptResponse:
    """A FunctionError: the script's fault when its limits ran out, else the executor's."""
    payload = payload if isinstance(payload, dict) else {"errorMessage": str(payload)}
    kind = str(payload.get("errorType") or "")
    message = str(payload.get("errorMessage") or "")
    fault = _SCRIPT_FAULTS.get(kind) or ("The script exceeded the executor's time limit"
                                         if "Task timed out" in message else None)
    if fault:
        return ScriptResponse(error=f"{fault}: {message}" if message else fault)
    raise ProviderError("The script executor failed.", dev_message=f"{kind}: {message}")
