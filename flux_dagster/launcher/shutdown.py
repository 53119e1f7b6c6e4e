"""What the zygote does with runs still in flight when the deployment stops (see
``zygote.Zygote.drain``): after the grace period they are terminated, and each execution they
ran is offered again as a new ``pending`` row (a new row, so a new run key), never left
``running``."""

from __future__ import annotations

import logging
import os

from flux_dagster.db.models import PendingExecution

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 20.0
# After SIGTERM, how long a run worker has to record its interruption before SIGKILL.
TERMINATE_WAIT_S = 10.0
SHUTDOWN_MESSAGE = "The worker shut down while this execution ran; it was queued again as pending execution {}."


def shutdown_grace_s() -> float:
    return float(os.environ.get("FLUX_SHUTDOWN_GRACE_S") or DEFAULT_GRACE_S)


def report_canceling(instance, run_ids: list[str]) -> None:
    """What ``WarmRunLauncher.terminate`` does first: the interrupted run then ends CANCELED."""
    for run_id in run_ids:
        try:
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                instance.report_run_canceling(run)
        except Exception:  # noqa: BLE001 - storage trouble: the run still gets its signal
            log.exception("could not mark run %s canceling", run_id)


def offer_again(instance, run_ids: list[str]) -> list[int]:
    """For each interrupted run: the run marked canceled if its worker could not say so, and its
    execution's row cancelled with a pointer to the new ``pending`` row. Returns the new row ids."""
    from flux_dagster import settings
    from flux_dagster.backfill import requeue_row
    from flux_dagster.db.engine import session_scope
    from flux_dagster.ops.lifecycle import PENDING_EXECUTION_TAG
    from flux_dagster.queue import fail_unlaunchable

    new_ids = []
    for run_id in run_ids:
        try:
            run = instance.get_run_by_id(run_id)
            if run is None:
                continue
            if not run.is_finished:
                instance.report_run_canceled(run, message="Terminated by a worker shutdown.")
            pending_id = run.tags.get(PENDING_EXECUTION_TAG)
            if pending_id is None:
                continue
            with session_scope(settings.database_url()) as session:
                row = session.get(PendingExecution, int(pending_id), with_for_update=True)
                # Only while this run still owns the row and did not complete or fail it.
                if row is None or row.dagster_run_id != run_id or row.status in ("completed", "failed"):
                    continue
                new = requeue_row(session, row)
                fail_unlaunchable(session, row, SHUTDOWN_MESSAGE.format(new.id), status="cancelled")
                new_ids.append(new.id)
        except Exception:  # noqa: BLE001 - one run's trouble must not keep the others running
            log.exception("could not offer again the execution of run %s", run_id)
    return new_ids
