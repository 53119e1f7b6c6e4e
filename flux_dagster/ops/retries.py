"""Retry rules, in one visible place (docs/retries.md mirrors this table).

Only retryable errors (timeouts, 429, 5xx, connection failures) reach a RetryPolicy; everything
else ends the step at once with ``Failure(allow_retries=False)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import Backoff, Failure, Jitter, RetryPolicy
from dagster._core.errors import DagsterExecutionInterruptedError

from flux_dagster.errors import ExecutionCancelled, FluxError, classify

CANCELLED_MESSAGE = "The execution was cancelled."

# Tests shrink the delays; production keeps the table's seconds.
_DELAY_SCALE = float(os.environ.get("FLUX_RETRY_DELAY_SCALE", "1"))


def _policy(max_retries: int, delay_s: float) -> RetryPolicy:
    return RetryPolicy(
        max_retries=max_retries, delay=delay_s * _DELAY_SCALE, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
    )


#  op                         retries  first delay (s), doubling with ±jitter
RETRY_POLICIES: dict[str, RetryPolicy] = {
    "notify_status": _policy(2, 0.5),
    "get_info_in_database": _policy(2, 0.5),
    "validate_model_access": _policy(3, 1.0),
    "text_generator": _policy(3, 2.0),
    "charge_tokens": _policy(5, 1.0),
    "scripting": _policy(2, 1.0),  # Lambda throttling/5xx only: a failing script never retries
    "generate_file": _policy(3, 1.0),
    "display_box": _policy(3, 1.0),
    "api_caller": _policy(3, 2.0),
    "math_function": _policy(2, 0.5),
    "counter": _policy(2, 0.5),
    "sql_querier": _policy(3, 2.0),
    "image_generator": _policy(3, 2.0),
    "charge_image_credits": _policy(5, 1.0),
    "audio_transcriber": _policy(3, 2.0),
    "mcp_client": _policy(2, 1.0),  # listing and the model's choice only: a tool call is never repeated
    "charge_mcp_tokens": _policy(5, 1.0),
    "generate_execution_logs": _policy(2, 0.5),
    # process_agent: a node's whole stage chain, retried inside its step (see agent.retrying).
    "agent_node": _policy(3, 1.0),
    # deliver_run_outputs (reference §2.3): attempts − 1 retries. Email and callback delays double
    # from the first, capped (delivery_retry_delay); the report/delete ones never reach their 30 s cap.
    "load_delivery_plan": _policy(3, 1.0),
    "deliver_email": _policy(2, 30.0),
    "deliver_callback": _policy(7, 5.0),
    "report_delivery_outcome": _policy(4, 1.0),
    "delete_delivery_plan": _policy(4, 1.0),
}

DELIVERY_DELAY_CAPS_S = {"deliver_email": 120.0, "deliver_callback": 120.0}


@contextmanager
def node_errors() -> Iterator[None]:
    """Classify whatever the body raises: retryable errors go to the RetryPolicy, others stop."""
    try:
        yield
    except (DagsterExecutionInterruptedError, ExecutionCancelled) as exc:
        # A terminated run (or a node that stopped for a cancellation): Dagster would retry an
        # interrupted step that has a RetryPolicy.
        raise Failure(description=CANCELLED_MESSAGE, allow_retries=False) from exc
    except Failure:
        raise
    except Exception as exc:
        error = classify(exc)
        if error.retryable:
            if error is exc:
                raise
            raise error from exc
        raise Failure(
            description=error.user_message,
            metadata={"code": error.code, "dev_message": error.dev_message},
            allow_retries=False,
        ) from error


def error_of(exc: BaseException | None) -> FluxError:
    """The FluxError behind what a failed step raised."""
    if isinstance(exc, Failure) and exc.__cause__ is not None:
        return classify(exc.__cause__)
    if isinstance(exc, Failure):
        return classify(RuntimeError(exc.description or "Step failed"))
    return classify(exc or RuntimeError("Unknown error in the run"))


def was_interrupted(exc: BaseException | None) -> bool:
    """Whether a step failed because its run was terminated (not because its work failed)."""
    return isinstance(exc, (DagsterExecutionInterruptedError, KeyboardInterrupt)) or (
        isinstance(exc, Failure) and isinstance(exc.__cause__, (DagsterExecutionInterruptedError, ExecutionCancelled))
    )


def delivery_retry_delay(name: str, retry_number: int, at_least_s: float | None = None) -> float:
    """The reference's delivery backoff: first delay × 2^retry, capped; a ``Retry-After`` the
    receiver asked for is honoured up to the same cap."""
    cap = DELIVERY_DELAY_CAPS_S[name] * _DELAY_SCALE
    delay = min(cap, RETRY_POLICIES[name].delay * 2**retry_number)
    if at_least_s is not None:
        delay = max(delay, min(cap, at_least_s * _DELAY_SCALE))
    return delay
