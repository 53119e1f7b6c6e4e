"""Dagster's Postgres storage with two changes for run hosts that execute many runs at once
(``GroupCommitEventLogStorage``, ``CachedColumnsRunStorage``); built by ``EnvSelectedStorage``
(``instance_storage.py``) when the environment names a Postgres URL."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future

from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from psycopg2 import extras

_EVENT_COLUMNS = ("run_id", "event", "dagster_event_type", "timestamp", "step_key", "asset_key", "partition")
_INSERT_EVENTS = f"INSERT INTO {SqlEventLogStorageTable.name} ({', '.join(_EVENT_COLUMNS)}) VALUES %s"


class GroupCommitEventLogStorage(PostgresEventLogStorage):
    """Dagster's Postgres event log, each event still stored before ``store_event`` returns, but:

    - the events that the threads of a process store at the same moment (a run host's runs) are
      written by one thread in one INSERT: under a burst, one round trip and one commit for many
      events instead of two statements each (the ``NOTIFY`` that Dagster still sends for older
      webservers is left out: its event watcher polls);
    - a batch of step events is committed without waiting for the WAL flush (``SET LOCAL
      synchronous_commit = off``, ~0.6 ms an event here): a crash of the Postgres server itself
      can lose the last fraction of a second of step events of the runs then in progress. A batch
      holding a run event (run started, succeeded, failed, canceled) waits for the flush, which
      also makes everything written before it durable: a finished run's log is whole.

    Asset events, which update more tables, take Dagster's own path."""

    def __init__(self, postgres_url: str):
        super().__init__(postgres_url)
        self._writer = _GroupWriter(self._insert_batch)

    def store_event(self, event) -> None:
        if event.is_dagster_event and event.dagster_event_type in (*ASSET_EVENTS, *ASSET_CHECK_EVENTS):
            return super().store_event(event)
        self._writer.write(event)

    def _insert_batch(self, events: list) -> None:
        rows = []
        for event in events:
            row = self._event_to_row(event)
            rows.append(tuple(row[column] for column in _EVENT_COLUMNS))
        run_event = any(event.is_dagster_event and event.get_dagster_event().is_job_event for event in events)
        # One simple query, so one implicit transaction: SET LOCAL applies to this INSERT only.
        statement = _INSERT_EVENTS if run_event else "SET LOCAL synchronous_commit = off; " + _INSERT_EVENTS
        with self._connect() as conn:
            # psycopg2's execute_values on the pooled connection: the batch as one statement,
            # without SQLAlchemy's bind processing for each row.
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                extras.execute_values(cursor, statement, rows, page_size=len(rows))
            finally:
                cursor.close()


class CachedColumnsRunStorage(PostgresRunStorage):
    """Dagster's Postgres run storage, but whether the runs table has its start/end time columns
    is looked up once per process: Dagster reflects the table's columns (a catalog query) for every
    run read and every run event. Only a ``dagster instance migrate`` adds them, and processes are
    restarted after one."""

    _has_run_stats_cols = False

    def has_run_stats_index_cols(self) -> bool:
        if not self._has_run_stats_cols:
            self._has_run_stats_cols = super().has_run_stats_index_cols()
        return self._has_run_stats_cols


class FluxPostgresStorage(DagsterStorage):
    """Dagster's Postgres storage (as ``dagster_postgres.DagsterPostgresStorage`` builds it), with
    the run storage and event log above."""

    def __init__(self, postgres_url: str, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        self._run_storage = CachedColumnsRunStorage(postgres_url)
        self._event_log_storage = GroupCommitEventLogStorage(postgres_url)
        self._schedule_storage = PostgresScheduleStorage(postgres_url)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @property
    def event_log_storage(self) -> GroupCommitEventLogStorage:
        return self._event_log_storage

    @property
    def run_storage(self) -> CachedColumnsRunStorage:
        return self._run_storage

    @property
    def schedule_storage(self) -> PostgresScheduleStorage:
        return self._schedule_storage


class _GroupWriter:
    """Hands items from any thread to one writer thread, which writes whatever has queued up
    while it wrote the last batch in one call; ``write`` returns once its item is written (or
    raises what the write raised). The thread is started on first use; a forked child (a run
    host forked from the zygote) starts afresh, with a lock and queue of its own."""

    def __init__(self, write_batch):
        self._write_batch = write_batch
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[object, Future]] = []
        self._started = False

    def write(self, item) -> None:
        future: Future = Future()
        with self._cond:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="event-log-writer", daemon=True).start()
            self._queue.append((item, future))
            self._cond.notify()
        future.result()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue:
                    cond.wait()
                batch, self._queue = self._queue, []
            try:
                self._write_batch([item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - each writer gets it, as from its own write
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for _, future in batch:
                    future.set_result(None)
