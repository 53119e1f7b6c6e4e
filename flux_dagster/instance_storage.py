"""Dagster storage picked by the environment, so one ``dagster.yaml`` serves every set-up:
Postgres run/event/schedule storage when ``DAGSTER_PG_URL`` (or ``DAGSTER_PG_HOST`` and friends)
is set, else SQLite under ``DAGSTER_HOME``. Plugged in through dagster.yaml's ``storage: custom``."""

from __future__ import annotations

import os
from urllib.parse import quote

from dagster import Field, StringSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData


def postgres_url_from_env() -> str | None:
    url = os.environ.get("DAGSTER_PG_URL")
    if not url and os.environ.get("DAGSTER_PG_HOST"):
        user = quote(os.environ.get("DAGSTER_PG_USERNAME", "postgres"))
        password = os.environ.get("DAGSTER_PG_PASSWORD")
        auth = f"{user}:{quote(password)}" if password else user
        url = (
            f"postgresql://{auth}@{os.environ['DAGSTER_PG_HOST']}:{os.environ.get('DAGSTER_PG_PORT', '5432')}"
            f"/{os.environ.get('DAGSTER_PG_DB', 'dagster')}"
        )
    if not url:
        return None
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres runs on psycopg2.
    return "postgresql+psycopg2://" + url.split("://", 1)[1] if url.startswith(("postgresql://", "postgres://")) else url


# Connections a process may open beyond the one each storage keeps (run, event log, schedules).
POOL_MAX_OVERFLOW = 4


class EnvSelectedStorage(DagsterStorage, ConfigurableClass):
    """Builds the concrete Dagster storage; never instantiated itself (Dagster checks the type)."""

    @classmethod
    def config_type(cls):
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value):
        url = postgres_url_from_env()
        if url:
            # Imported only here: dagster_postgres adds ~0.7 s to the start of every process.
            from flux_dagster.postgres_storage import FluxPostgresStorage

            storage = FluxPostgresStorage(url, inst_data)
            # Pooled connections in every process (the storage's own pooled mode, the one
            # dagster-webserver turns on), not a new connection (a Postgres backend) per storage
            # call: the daemon makes thousands of calls a minute under load (bench/peer.py). No
            # statement timeout, as in the default mode. Engines connect lazily, so a process
            # that forks (the run zygote) holds no connection to hand down.
            for part in (storage.run_storage, storage.event_log_storage, storage.schedule_storage):
                part.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=POOL_MAX_OVERFLOW)
            return storage
        from dagster._core.storage.sqlite_storage import DagsterSqliteStorage

        base_dir = config_value.get("base_dir") or os.path.join(os.environ["DAGSTER_HOME"], "storage")
        return DagsterSqliteStorage.from_local(base_dir=base_dir, inst_data=inst_data)
