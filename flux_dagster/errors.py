"""The original worker's error classes (reference §3.13) and their retryable flags.

Every failure an execution can meet is turned into one of these before it leaves an op, so the
retry decision is made in one place: retryable errors go back to Dagster's RetryPolicy, the
rest end the step at once with ``Failure(allow_retries=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# What a user (and pending_executions.error) ever sees of one error; the stack goes to the log.
MAX_USER_MESSAGE = 2000
MAX_DEV_MESSAGE = 10_000


def bounded(text: str, limit: int = MAX_USER_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying so: user values are never echoed whole."""
    if len(text) <= limit:
        return text
    note = f"… [{len(text) - limit + 40:,} more characters cut]"
    return text[: limit - len(note)] + note


def shorten(value: object, limit: int = 120) -> str:
    """A user-supplied value as it may appear inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FluxError(Exception):
    """Base class: ``user_message`` is what the platform shows the user (at most 2,000 characters)."""

    retryable = False
    code = "SYSTEM_ERROR"
    # Seconds the failing service asked us to wait (HTTP Retry-After), honoured by the retry schedule.
    retry_after_s: float | None = None

    def __init__(self, user_message: str, *, dev_message: str | None = None, field: str | None = None):
        user_message = bounded(str(user_message))
        dev_message = bounded(str(dev_message), MAX_DEV_MESSAGE) if dev_message else user_message
        super().__init__(dev_message)
        self.user_message = user_message
        self.dev_message = dev_message
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

    def __init__(self, user_message: str, *, retryable: bool = False, status_code: int | None = None,
                 retry_after_s: float | None = None, **kw):
        super().__init__(user_message, **kw)
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after_s = retry_after_s


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


def retry_after_of(headers) -> float | None:
    """An HTTP ``Retry-After`` (seconds or an HTTP date), or ``retry-after-ms``, in seconds."""
    if headers is None:
        return None
    from email.utils import parsedate_to_datetime
    from datetime import datetime, timezone

    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max((parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds(), 0.0)
        except (TypeError, ValueError):
            return None


def provider_error_from_status(provider: str, status: int | None, detail: str, headers=None) -> ProviderError:
    """429, 408 and 5xx are transient; other 4xx (bad request, auth, permission) never are."""
    retryable = status is None or status in (408, 409, 429) or status >= 500
    return ProviderError(
        f"{provider} request failed" + (f" (HTTP {status})" if status else "") + f": {detail}",
        retryable=retryable,
        status_code=status,
        retry_after_s=retry_after_of(headers),
    )


@contextmanager
def http_errors(provider: str) -> Iterator[None]:
    """httpx's timeouts and connection failures calling a provider, as the worker's (retryable) errors."""
    import httpx

    try:
        yield
    except httpx.TimeoutException as exc:
        raise ExecutionTimeoutError(f"{provider} did not answer in time.") from exc
    except httpx.TransportError as exc:
        raise ProviderError(f"{provider} could not be reached.", retryable=True) from exc


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
    # The app DB or Redis unreachable for a while is infrastructure trouble, never the user's.
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return IntegrationError("The worker's database is unavailable; the execution will be retried.",
                                dev_message=f"{type(exc).__name__}: {exc}")
    if type(exc).__module__.startswith("redis") and type(exc).__name__ in ("ConnectionError", "TimeoutError"):
        return IntegrationError("Redis is unavailable.", dev_message=f"{type(exc).__name__}: {exc}")
    return SystemError_(
        "The worker hit an internal error while running this node.",
        dev_message=f"{type(exc).__name__}: {exc}",
    )
