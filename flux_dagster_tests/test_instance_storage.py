"""The Postgres storage of flux_dagster/postgres_storage.py, on the machine's Postgres: the group-
commit event log keeps every event and each run's order whatever the threads do, sends no NOTIFY,
commits step events without waiting for the WAL flush and run events with it; a failed write
reaches every writer of its batch, a forked child gets a writer of its own; the run storage
reflects the runs table once."""

from __future__ import annotations

import os
import threading

import pytest
from dagster._core.events.log import EventLogEntry
from sqlalchemy import event as sa_event

from flux_dagster.instance_storage import postgres_url_from_env
from flux_dagster.postgres_storage import FluxPostgresStorage, _GroupWriter
from flux_dagster_tests.deployment import postgres_database


@pytest.fixture
def storage():
    with postgres_database() as url:
        os.environ["DAGSTER_PG_URL"] = url
        try:
            storage = FluxPostgresStorage(postgres_url_from_env())
            yield storage
        finally:
            os.environ.pop("DAGSTER_PG_URL")
            for part in (storage.run_storage, storage.event_log_storage, storage.schedule_storage):
                part.dispose()


def _entry(run_id: str, message: str) -> EventLogEntry:
    return EventLogEntry(error_info=None, level=20, user_message=message, run_id=run_id, timestamp=1.0)


def test_events_of_many_threads_are_all_stored_in_each_runs_order(storage, monkeypatch):
    import psycopg2
    import psycopg2.extras

    events = storage.event_log_storage
    events.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
    statements, execute_values = [], psycopg2.extras.execute_values

    def recording(cursor, sql, rows, **kwargs):
        statements.append((sql, len(rows)))
        return execute_values(cursor, sql, rows, **kwargs)

    monkeypatch.setattr(psycopg2.extras, "execute_values", recording)
    listener = psycopg2.connect(postgres_url_from_env().replace("postgresql+psycopg2", "postgresql"))
    listener.autocommit = True
    listener.cursor().execute("LISTEN run_events")  # the channel Dagster notifies on

    def run(n: int) -> None:
        for i in range(25):
            events.store_event(_entry(f"run-{n}", f"{n}:{i}"))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in range(12):
        stored = [r.user_message for r in events.get_logs_for_run(f"run-{n}")]
        assert stored == [f"{n}:{i}" for i in range(25)]
    # Fewer INSERTs than events (the threads' events shared them), each without waiting for the
    # WAL flush (no run event among them), and no NOTIFY.
    assert sum(n for _, n in statements) == 300 and len(statements) < 300
    assert all(sql.startswith("SET LOCAL synchronous_commit = off;") for sql, _ in statements)
    listener.poll()
    assert listener.notifies == []
    listener.close()


def test_a_batch_with_a_run_event_waits_for_the_wal_flush(storage, monkeypatch):
    import psycopg2.extras
    from dagster import DagsterEventType
    from dagster._core.events import DagsterEvent

    statements, execute_values = [], psycopg2.extras.execute_values
    monkeypatch.setattr(psycopg2.extras, "execute_values",
                        lambda cursor, sql, rows, **kw: (statements.append(sql), execute_values(cursor, sql, rows, **kw)))
    run_event = EventLogEntry(error_info=None, level=20, user_message="", run_id="run-x", timestamp=1.0,
                              dagster_event=DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name="job"))
    storage.event_log_storage.store_event(run_event)
    assert statements and not statements[0].startswith("SET LOCAL")
    assert [r.dagster_event_type for r in storage.event_log_storage.get_logs_for_run("run-x")] == \
        [DagsterEventType.RUN_SUCCESS]


def test_a_failed_write_raises_in_every_writer_of_its_batch_and_the_writer_goes_on():
    release, calls = threading.Event(), []

    def write_batch(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(10)  # hold the first batch so that the next ones queue up together
        if "bad" in items:
            raise RuntimeError("storage down")

    writer = _GroupWriter(write_batch)
    errors: dict[str, BaseException | None] = {}

    def write(item):
        try:
            writer.write(item)
            errors[item] = None
        except RuntimeError as exc:
            errors[item] = exc

    first = threading.Thread(target=write, args=("first",))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    queued = [threading.Thread(target=write, args=(item,)) for item in ("a", "bad", "b")]
    for t in queued:
        t.start()
    while len(writer._queue) < 3:
        threading.Event().wait(0.01)
    release.set()
    for t in (first, *queued):
        t.join(10)
    assert calls[1] == sorted(calls[1], key=["a", "bad", "b"].index) and set(calls[1]) == {"a", "bad", "b"}
    assert errors["first"] is None
    assert all(isinstance(errors[item], RuntimeError) for item in ("a", "bad", "b"))
    writer.write("after")  # the writer thread survived the failure
    assert calls[-1] == ["after"]


def test_a_forked_child_writes_through_a_writer_of_its_own():
    written = []
    writer = _GroupWriter(written.extend)
    writer.write("parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's writer thread is not there
        try:
            writer.write("child")
            os.write(write, b"ok" if written == ["parent", "child"] else b"no")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"
    assert written == ["parent"]


def test_the_runs_table_is_reflected_once(storage):
    runs = storage.run_storage
    assert runs.has_run_stats_index_cols()
    statements = []
    sa_event.listen(runs._engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    for _ in range(5):
        assert runs.has_run_stats_index_cols()
        runs.get_run_records(limit=1)
    assert len(statements) == 5  # the five reads, no catalog query with them
    assert not [s for s in statements if "pg_catalog" in s or "pg_attribute" in s]
