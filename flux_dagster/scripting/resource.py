"""The ``script_runner`` resource: where scripting nodes run.

``FLUX_SCRIPT_RUNNER`` = ``local`` | ``lambda`` | ``auto`` (default). ``auto`` takes Lambda when
``LAMBDA_PYTHON_ALIAS`` or ``LAMBDA_ENDPOINT`` is set, else the local sandbox. AWS credentials alone
do not select Lambda: the file store may hold them for S3 too.
"""

from typing import Any

from dagster import ConfigurableResource, EnvVar

from flux_dagster import settings
from flux_dagster.errors import SystemError_
from flux_dagster.scripting import ScriptRunner
from flux_dagster.scripting.lambda_runner import DEFAULT_REGION, JS_FUNCTION, PYTHON_FUNCTION, LambdaRunner
from flux_dagster.scripting.sandbox import LocalSandboxRunner


class ScriptRunnerResource(ConfigurableResource):
    """``local``: the bubblewrap sandbox (limits below); ``lambda``: the code-executor Lambdas,
    whose own configuration sets their limits."""

    mode: str = "local"
    timeout_s: float = 30.0
    memory_mb: int = 512
    output_limit_bytes: int = 1_000_000
    sandbox_profile: str = "host"
    lambda_endpoint: str | None = None
    lambda_python_alias: str | None = None
    lambda_python_function: str = PYTHON_FUNCTION
    lambda_js_function: str = JS_FUNCTION
    aws_region: str = DEFAULT_REGION
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None

    def runner(self) -> ScriptRunner:
        if self.mode == "local":
            return LocalSandboxRunner(timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                                      output_limit_bytes=self.output_limit_bytes, profile=self.sandbox_profile)
        if self.mode == "lambda":
            return LambdaRunner(
                python_alias=self.lambda_python_alias, endpoint_url=self.lambda_endpoint, region=self.aws_region,
                access_key_id=self.aws_access_key_id, secret_access_key=self.aws_secret_access_key,
                session_token=self.aws_session_token, python_function=self.lambda_python_function,
                js_function=self.lambda_js_function,
                read_timeout_s=self.timeout_s + 60,  # the function's own limit, plus a cold start
            )
        raise SystemError_("The script runner is misconfigured.",
                           dev_message=f"unknown script runner mode {self.mode!r} (local or lambda)")

    @classmethod
    def from_env(cls) -> "ScriptRunnerResource":
        mode = (settings.env("FLUX_SCRIPT_RUNNER") or "auto").lower()
        if mode == "auto":
            mode = "lambda" if settings.env("LAMBDA_PYTHON_ALIAS") or settings.env("LAMBDA_ENDPOINT") else "local"
        if mode != "lambda":
            return cls(mode=mode, sandbox_profile=settings.env("FLUX_SANDBOX_PROFILE", "host"))
        secrets: dict[str, Any] = {
            field: EnvVar(name)
            for field, name in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
                                ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                                ("aws_session_token", "AWS_SESSION_TOKEN"))
            if settings.env(name)
        }
        return cls(mode=mode, lambda_endpoint=settings.env("LAMBDA_ENDPOINT"),
                   lambda_python_alias=settings.env("LAMBDA_PYTHON_ALIAS"),
                   aws_region=settings.env("AWS_REGION", DEFAULT_REGION), **secrets)
