"""Retry rules, in one visible place (docs/retries.md mirrors this table).

Only retryable errors (timeouts, 429, 5xx, connection failures of the app DB, Redis, the main API,
a provider) are retried; everything else ends the step at once with ``Failure(allow_retries=False)``.

One schedule for both jobs: the wait before retry ``n`` (0-based) is ``first_delay × 2ⁿ``, at most
``MAX_DELAY_S``, ±20 % jitter, and never shorter than what the failing service asked for
(``Retry-After``, up to ``MAX_RETRY_AFTER_S``). ``process_single_node``'s ops hand that wait to
Dagster (``RetryRequested``: each retry is a visible step retry in the UI); ``process_agent`` waits
inside the node's step with the same numbers (``agent_retrying``). With 9 retries from 1 s the
waits add up to ~2.5 minutes, so a dependency that is away for a minute fails nothing; a step
also stops retrying once another attempt could not end within ``GIVE_UP_AFTER_S`` of its first one,
so a provider that stays broken fails the execution within 5 minutes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import (
    DagsterInvariantViolationError, DagsterRunStatus, Failure, Jitter, OpExecutionContext, RetryPolicy, RetryRequested,
)
from dagster._core.errors import DagsterExecutionInterruptedError

from flux_dagster.errors import ExecutionCancelled, ExecutionTimeoutError, FluxError, classify
from flux_dagster.interrupts import interruptible, raise_after

CANCELLED_MESSAGE = "The execution was cancelled."

# Tests shrink the delays; production keeps the table's seconds.
_DELAY_SCALE = float(os.environ.get("FLUX_RETRY_DELAY_SCALE", "1"))
MAX_DELAY_S = 30.0
MAX_RETRY_AFTER_S = 60.0
# Real seconds (not scaled): no attempt starts that could not finish within this of the first one.
GIVE_UP_AFTER_S = 300.0


def _policy(max_retries: int, delay_s: float) -> RetryPolicy:
    # The numbers of the schedule. Dagster applies the policy itself (a constant delay, so bounded)
    # only to what escapes ``node_errors``; everything inside it gets the capped doubling schedule.
    return RetryPolicy(max_retries=max_retries, delay=delay_s * _DELAY_SCALE, jitter=Jitter.PLUS_MINUS)


#  op                         retries  first delay (s), doubling to 30 s with ±20 % jitter
RETRY_POLICIES: dict[str, RetryPolicy] = {
    "notify_status": _policy(9, 1.0),
    "get_info_in_database": _policy(9, 1.0),
    "validate_model_access": _policy(9, 1.0),
    "text_generator": _policy(9, 2.0),
    "charge_tokens": _policy(9, 1.0),
    "scripting": _policy(9, 1.0),  # Lambda throttling/5xx only: a failing script never retries
    "generate_file": _policy(9, 1.0),
    "display_box": _policy(9, 1.0),
    "api_caller": _policy(3, 2.0),  # safe methods and unsent requests only (docs/retries.md)
    "math_function": _policy(9, 1.0),
    "counter": _policy(9, 1.0),
    "sql_querier": _policy(3, 2.0),  # connecting only: a statement that may have run is never retried
    "image_generator": _policy(9, 2.0),
    "charge_image_credits": _policy(9, 1.0),
    "audio_transcriber": _policy(9, 2.0),
    "mcp_client": _policy(2, 1.0),  # listing and the model's choice only: a tool call is never repeated
    "charge_mcp_tokens": _policy(9, 1.0),
    "generate_execution_logs": _policy(9, 1.0),
    # process_agent: a node's whole stage chain, retried inside its step (see agent_retrying).
    "agent_node": _policy(9, 1.0),
    # deliver_run_outputs (reference §2.3): attempts − 1 retries. Email and callback delays double
    # from the first, capped (delivery_retry_delay); the report/delete ones never reach their 30 s cap.
    "load_delivery_plan": _policy(3, 1.0),
    "deliver_email": _policy(2, 30.0),
    "deliver_callback": _policy(7, 5.0),
    "report_delivery_outcome": _policy(4, 1.0),
    "delete_delivery_plan": _policy(4, 1.0),
}

DELIVERY_DELAY_CAPS_S = {"deliver_email": 120.0, "deliver_callback": 120.0}


# Start-to-close per attempt (reference §2.1: node activities 1 min, counter 2 min, image generator
# 5 min, MCP 5 min); the rest are our choice, in docs/retries.md. Past it the attempt ends with
# ExecutionTimeoutError: retried like any timeout, except where a repeat could act twice.
DEFAULT_DEADLINE_S = 60.0
OP_DEADLINES_S: dict[str, float] = {
    "text_generator": 600.0,  # a long streamed answer (large maxOutputToken); each read times out at 120 s
    "counter": 120.0,
    "image_generator": 300.0,
    "mcp_client": 300.0,
    "audio_transcriber": 900.0,  # download, ffmpeg segments, one transcription per 600 s segment
    "generate_file": 600.0,  # the original's 10 minutes for generate-file
    "display_box": 600.0,
    "api_caller": 300.0,  # polling may run up to pollingRetryDuration
}
# Operators may override any of them: FLUX_OP_DEADLINES="counter=300,api_caller=600" (seconds).
OP_DEADLINES_S.update({name.strip(): float(value) for name, _, value in (
    item.partition("=") for item in os.environ.get("FLUX_OP_DEADLINES", "").split(",") if "=" in item)})
# A repeat could act on a user's system twice, or (counter) would only wait past its deadline again.
NOT_RETRIED_ON_DEADLINE = ("api_caller", "sql_querier", "mcp_client", "counter")
# What one attempt is expected to take at most, for the 5-minute budget (a hung call ends at its
# client's own timeout well before its op's deadline).
ATTEMPT_BOUND_S = 120.0


@contextmanager
def deadline(op_name: str) -> Iterator[None]:
    """The op's start-to-close timeout (``interrupts.raise_after``: on the run's own thread)."""
    seconds = OP_DEADLINES_S.get(op_name, DEFAULT_DEADLINE_S)

    def _expired() -> ExecutionTimeoutError:
        error = ExecutionTimeoutError(f"The step {op_name} did not finish within {seconds:g} s.")
        error.retryable = op_name not in NOT_RETRIED_ON_DEADLINE
        return error

    with raise_after(seconds, _expired):
        yield


def retry_delay(policy: RetryPolicy, retry_number: int, error: FluxError | None = None) -> float:
    """Seconds to wait before retry ``retry_number`` (0 = the first retry)."""
    base = policy.delay or 0.0
    delay = min(base * (2 ** retry_number), MAX_DELAY_S * _DELAY_SCALE)
    delay *= 1 + random.uniform(-0.2, 0.2)
    if error is not None and error.retry_after_s:
        delay = max(delay, min(error.retry_after_s, MAX_RETRY_AFTER_S) * _DELAY_SCALE)
    return delay


def should_retry(policy: RetryPolicy, retry_number: int, elapsed_s: float, wait_s: float,
                 attempt_timeout_s: float = 0.0) -> bool:
    """Another attempt, after ``retry_number`` retries and ``elapsed_s`` since the first attempt?"""
    return retry_number < policy.max_retries and elapsed_s + wait_s + attempt_timeout_s <= GIVE_UP_AFTER_S


def _final(error: FluxError, attempts: int = 1) -> Failure:
    if error.retryable and attempts > 1:
        error.user_message = f"{error.user_message} (gave up after {attempts} attempts)"
    return Failure(description=error.user_message, metadata={"code": error.code, "dev_message": error.dev_message},
                   allow_retries=False)


def cancel_own_run(context: OpExecutionContext | None, cause: BaseException | None = None) -> None:
    """End this run as CANCELED, the way a termination does: the run is marked CANCELING and the
    step stops as interrupted (the failure hook then cancels the row once), so the run's status
    and the row's agree."""
    if context is not None:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None and not run.is_finished and run.status != DagsterRunStatus.CANCELING:
            context.instance.report_run_canceling(run, message="Its execution was cancelled (cancel_requested_at).")
    raise Failure(description=CANCELLED_MESSAGE, allow_retries=False) from (
        cause or ExecutionCancelled(CANCELLED_MESSAGE))


def _current_op() -> OpExecutionContext | None:
    try:
        return OpExecutionContext.get()
    except DagsterInvariantViolationError:  # a plain call outside any op (unit tests)
        return None


def _first_attempt_started(context: OpExecutionContext) -> float:
    """When this step's first attempt started (its STEP_START event), else now."""
    from dagster import DagsterEventType

    step_key = context.get_step_execution_context().step.key
    try:
        starts = [e.timestamp for e in context.instance.all_logs(context.run_id, of_type=DagsterEventType.STEP_START)
                  if e.step_key == step_key]
    except Exception:  # noqa: BLE001 - the time budget is a safety net; the retry count still bounds it
        return time.time()
    return min(starts) if starts else time.time()


@contextmanager
def node_errors() -> Iterator[None]:
    """Classify whatever the body raises: retryable errors are retried on the schedule above,
    others stop the step at once. Inside an op, the body runs under the op's deadline."""
    context = _current_op()
    try:
        if context is None:
            yield
        else:
            # A termination of this run (run hosts: raised in this run's thread) or the deadline.
            with interruptible(), deadline(context.op_def.name):
                yield
    except DagsterExecutionInterruptedError as exc:
        # A terminated run: Dagster would retry an interrupted step that has a RetryPolicy.
        raise Failure(description=CANCELLED_MESSAGE, allow_retries=False) from exc
    except ExecutionCancelled as exc:  # the node saw the cancellation itself and settled its work
        cancel_own_run(_current_op(), exc)
    except (Failure, RetryRequested):
        raise
    except Exception as exc:
        error = classify(exc)
        if not error.retryable:
            raise _final(error) from error
        if context is None:
            if error is exc:
                raise
            raise error from exc
        policy = context.op_def.retry_policy or RETRY_POLICIES["notify_status"]
        retry_number = context.retry_number
        wait = retry_delay(policy, retry_number, error)
        elapsed = time.time() - _first_attempt_started(context) if retry_number else 0.0
        bound = min(OP_DEADLINES_S.get(context.op_def.name, DEFAULT_DEADLINE_S), ATTEMPT_BOUND_S)
        if not should_retry(policy, retry_number, elapsed, wait, bound):
            raise _final(error, retry_number + 1) from error
        context.log.warning(f"Attempt {retry_number + 1} failed ({error.code}): {error.user_message} "
                            f"— retrying in {wait:.1f} s")
        raise RetryRequested(max_retries=retry_number + 1, seconds_to_wait=wait) from error


def agent_retrying(policy: RetryPolicy, attempt_timeout_s: float = 0.0, log=None):
    """The same schedule, waited inside an agent node's step (a retried Dagster step would go
    back in the executor's queue behind the steps waiting for it)."""
    from tenacity import Retrying

    started = time.monotonic()

    def _stop(state) -> bool:
        error = classify(state.outcome.exception())
        wait = retry_delay(policy, state.attempt_number - 1, error)
        state.next_wait = wait
        return not should_retry(policy, state.attempt_number - 1, time.monotonic() - started, wait, attempt_timeout_s)

    def _before_sleep(state) -> None:
        if log is not None:
            error = classify(state.outcome.exception())
            log(f"Attempt {state.attempt_number} failed ({error.code}): {error.user_message} "
                f"— retrying in {state.next_wait:.1f} s")

    return Retrying(
        stop=_stop,
        wait=lambda state: getattr(state, "next_wait", 0.0),
        retry=lambda state: state.outcome.failed and classify(state.outcome.exception()).retryable,
        before_sleep=_before_sleep,
        reraise=True,
    )


def error_of(exc: BaseException | None) -> FluxError:
    """The FluxError behind what a failed step raised."""
    if isinstance(exc, (Failure, RetryRequested)) and exc.__cause__ is not None:
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
