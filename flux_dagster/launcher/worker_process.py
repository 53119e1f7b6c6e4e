"""Facts about a run worker process that the launcher and the zygote both need."""

from __future__ import annotations

import socket

# Run tags naming the run worker, written by the worker itself before the run starts. Launcher
# bookkeeping, not the user's: Dagster's GraphQL layer (so the UI) leaves out tags under its
# hidden prefix ``.dagster/`` (``dagster._core.storage.tags.HIDDEN_TAG_PREFIX``).
PID_TAG = ".dagster/flux_run_worker_pid"
HOST_TAG = ".dagster/flux_run_worker_host"
START_TAG = ".dagster/flux_run_worker_start_ticks"


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid from its reuse.
    None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if fields[0] == b"Z" else int(fields[19])


def worker_tags(pid: int) -> dict[str, str]:
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), START_TAG: str(process_start_ticks(pid) or "")}
