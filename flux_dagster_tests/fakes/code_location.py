"""A small code location for the run launcher tests: a quick job, and a slow one to kill or
terminate mid-run."""

from dagster import Definitions, in_process_executor, job, op

from flux_dagster import interrupts
from flux_dagster.interrupts import interruptible


@op
def say_hello() -> str:
    return "hello"


@op
def shout(word: str) -> str:
    return word.upper()


@job(executor_def=in_process_executor)
def quick_job():
    shout(say_hello())


@op
def wait_a_minute() -> None:
    with interruptible():  # as a node's body is (ops.retries.node_errors)
        interrupts.sleep(60)


@job(executor_def=in_process_executor)
def slow_job():
    wait_a_minute()


defs = Definitions(jobs=[quick_job, slow_job])
