"""A small code location for the run launcher tests: a quick job, and a slow one to kill or
terminate mid-run."""

import time

from dagster import Definitions, in_process_executor, job, op


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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)


@job(executor_def=in_process_executor)
def slow_job():
    wait_a_minute()


defs = Definitions(jobs=[quick_job, slow_job])
