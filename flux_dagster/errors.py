"""The original worker's error classes (reference §3.13) and their retryable flags.

Every failure an execution can meet is turned into one of these before it leaves an op, so the
retry decision is made in one place: retryable errors go back to Dagster's RetryPolicy, the
rest end the step at once with ``Failure(allow_retries=False)``.
"""

from __future__ import annotations


class FluxError(Exception):
    """Base class: ``user_message`` is what the platform shows the user."""

    retryable = False
    code = "SYSTEM_ERROR"

    def __init__(self, user_message: str, *, dev_message: str | None = None, field: str | None = None):
        super().__init__(dev_message or user_message)
        self.user_message = user_message
        self.dev_message = dev_message or user_message
        self.field = field


class UserConfigError(FluxError):
    """The node's configuration or input is wrong; retrying cannot help."""

    code = "USER_CONFIG_ERROR"


class IntegrationError(FluxError):
    """A connected service (main API, database, store) failed; usually transient."""

    retryable = True
    code = "INTEGRATION_ERROR"


class ProviderError(FluxError):
    """An LLM or other third-party provider failed; retryable only when marked so."""

    code = "PROVIDER_ERROR"

    def __init__(self, user_message: str, *, retryable: bool = False, status_code: int | None = None, **kw):
        super().__init__(user_message, **kw)
        self.retryable = retryable
        self.status_code = status_code


class ExecutionTimeoutError(FluxError):
    """The work exceeded its time budget (the original ``TimeoutError``)."""

    retryable = True
    code = "TIMEOUT_ERROR"


class ExecutionCancelled(FluxError):
    """The execution was cancelled while the node ran, and the node settled its partial work."""

    code = "CANCELLED"


class SystemError_(FluxError):  # noqa: N801 - ``SystemError`` is a Python builtin
    """Our bug or broken infrastructure; the fallback for anything unclassified."""

    code = "SYSTEM_ERROR"


def provider_error_from_status(provider: str, status: int | None, detail: str) -> ProviderError:
    """429, 408 and 5xx are transient; other 4xx (bad request, auth, permission) never are."""
    retryable = status is None or status in (408, 409, 429) or status >= 500
    return ProviderError(
        f"{provider} request failed" + (f" (HTTP {status})" if status else "") + f": {detail}",
        retryable=retryable,
        status_code=status,
    )


def classify(exc: BaseException) -> FluxError:
    """Map any exception to a FluxError, keeping FluxErrors as they are."""
    if isinstance(exc, FluxError):
        return exc
    import httpx  # cheap, already imported by the SDKs and our HTTP clients

    if isinstance(exc, httpx.TimeoutException):
        return ExecutionTimeoutError(f"Request timed out: {exc}")
    if isinstance(exc, httpx.TransportError):
        return IntegrationError(f"Connection failed: {exc}")
    if isinstance(exc, TimeoutError):
        return ExecutionTimeoutError(str(exc) or "Timed out")
    if isinstance(exc, ConnectionError):
        return IntegrationError(f"Connection failed: {exc}")
    return SystemError_(
        "The worker hit an internal error while running this node.",
        dev_message=f"{type(exc).__name__}: {exc}",
    )
