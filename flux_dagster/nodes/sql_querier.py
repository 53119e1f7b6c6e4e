"""SQL querier (``sqlQuerier``), reference §4.7: run the node's query on the user's PostgreSQL or
MySQL/MariaDB database through SQLAlchemy and write the rows as 2-space pretty JSON.

One connection per execution, closed in ``finally`` (no pool outlives the node). The host goes
through :mod:`flux_dagster.nodes.netguard` like the API caller's URL: the user's database may not
be the worker's own loopback or private-network services unless ``FLUX_SQLQUERIER_ALLOWED_HOSTS``
allows them.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from flux_dagster.errors import IntegrationError, UserConfigError
from flux_dagster.execution import NodeOutcome, NodeTask, persist_node_success
from flux_dagster.nodes.fields import Sessions, as_text, edge_value
from flux_dagster.nodes.netguard import AllowList, resolve_permitted

NODE_TYPE = "sqlQuerier"
ALLOWED_HOSTS_ENV = "FLUX_SQLQUERIER_ALLOWED_HOSTS"
CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 60

# dbms value (lower-cased) → (SQLAlchemy driver, default port)
ENGINES = {
    "postgresql": ("postgresql+psycopg2", 5432),
    "postgres": ("postgresql+psycopg2", 5432),
    "mysql": ("mysql+pymysql", 3306),
    "mariadb": ("mysql+pymysql", 3306),
}

# Connection failures that are the user's settings, not a passing outage: never retried.
_PG_CONFIG_FAILURES = ("authentication failed", "does not exist", "no pg_hba.conf entry", "certificate",
                       "does not support ssl")
_MYSQL_CONFIG_ERRNOS = {1044, 1045, 1049, 1698, 2026}


@dataclass(frozen=True)
class SqlTarget:
    dbms: str
    driver: str
    host: str
    port: int
    username: str
    password: str
    database: str
    ssl: bool
    ca: str


def target_of(data: dict[str, Any]) -> SqlTarget:
    dbms = str(data.get("dbms") or "").strip().lower()
    if dbms not in ENGINES:
        shown = dbms or "(none)"
        raise UserConfigError(
            f"The database type {shown!r} is not supported by this worker (supported: postgresql, mysql).",
            field="dbms",
        )
    driver, default_port = ENGINES[dbms]
    host = as_text(data.get("host")).strip()
    if not host:
        raise UserConfigError("The database host is empty.", field="host")
    try:
        port = int(data.get("port") or default_port)
    except (TypeError, ValueError) as exc:
        raise UserConfigError(f"The port {data.get('port')!r} is not a number.", field="port") from exc
    ssl_on = data.get("ssl") is True or str(data.get("ssl")).strip().lower() in ("true", "1", "require")
    return SqlTarget(dbms, driver, host, port, as_text(data.get("username")), as_text(data.get("password")),
                     as_text(data.get("database")), ssl_on, as_text(data.get("ca")).strip())


def _jsonable(value: Any) -> Any:
    # Decimals stay strings, exact, as node-postgres and mysql2 return them to the original.
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):  # MySQL TIME
        sign = "-" if value < timedelta(0) else ""
        seconds = abs(value)
        hours, rest = divmod(seconds.days * 86400 + seconds.seconds, 3600)
        micro = f".{seconds.microseconds:06d}" if seconds.microseconds else ""
        return f"{sign}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}{micro}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (uuid.UUID, set, frozenset)):
        return str(value) if isinstance(value, uuid.UUID) else sorted(value, key=str)
    return str(value)


def rows_json(rows: Any) -> str:
    return json.dumps(rows, indent=2, default=_jsonable, ensure_ascii=False)


def _ssl_context(ca: str) -> ssl.SSLContext:
    if ca:
        try:
            return ssl.create_default_context(cadata=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise UserConfigError(f"The CA certificate is not valid PEM: {exc}.", field="ca") from exc
    context = ssl.create_default_context()
    # ssl without a CA encrypts without verifying, as libpq's sslmode=require does.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _connect_args(target: SqlTarget, address: str, ca_file: str | None) -> tuple[str, dict[str, Any]]:
    """(host for the URL, driver arguments), connecting to the address the guard checked."""
    if target.driver.startswith("postgresql"):
        # libpq connects to hostaddr and still verifies the certificate against host.
        args: dict[str, Any] = {"hostaddr": address, "connect_timeout": CONNECT_TIMEOUT_S,
                                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
                                "application_name": "flux-dagster-sql-querier"}
        if target.ssl:
            args["sslmode"] = "verify-full" if ca_file else "require"
            if ca_file:
                args["sslrootcert"] = ca_file
        return target.host, args
    args = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": STATEMENT_TIMEOUT_S,
            "write_timeout": STATEMENT_TIMEOUT_S, "charset": "utf8mb4"}
    if target.ssl:
        args["ssl"] = _ssl_context(target.ca)
    # With a CA the certificate must name the host, so a re-resolved address cannot impersonate it;
    # otherwise connect to the checked address itself.
    return (target.host if target.ssl and target.ca else address), args


def _errno(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _connect_error(target: SqlTarget, exc: BaseException) -> Exception:
    detail = str(exc).strip()[:500]
    if target.driver.startswith("mysql"):
        config = _errno(exc) in _MYSQL_CONFIG_ERRNOS
    else:
        config = any(marker in detail.lower() for marker in _PG_CONFIG_FAILURES)
    message = f"Could not connect to the {target.dbms} database at {target.host}:{target.port}: {detail}"
    return UserConfigError(message) if config else IntegrationError(message)


def _connection_lost(dbapi: Any, connection: Any, exc: BaseException) -> bool:
    # psycopg2 marks a dead connection ``closed``; pymysql says 2006/2013 (server gone / lost).
    return (isinstance(exc, dbapi.InterfaceError) or _errno(exc) in (2006, 2013)
            or bool(getattr(connection, "closed", 0)))


def _fetch(cursor: Any) -> Any:
    if cursor.description is None:
        return {"affectedRows": cursor.rowcount}
    keys = [column[0] for column in cursor.description]
    return [dict(zip(keys, row)) for row in cursor.fetchall()]


def _connect(target: SqlTarget, address: str, ca_file: str | None) -> tuple[Any, Any]:
    """(engine, the driver's connection) to one checked address."""
    host, connect_args = _connect_args(target, address, ca_file)
    url = URL.create(target.driver, username=target.username or None, password=target.password or None,
                     host=host, port=target.port, database=target.database or None)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        return engine, engine.raw_connection()
    except (DBAPIError, engine.dialect.loaded_dbapi.Error) as exc:
        engine.dispose()
        raise _connect_error(target, getattr(exc, "orig", None) or exc) from exc


def run_query(target: SqlTarget, query: str, allow: AllowList) -> Any:
    """The query's rows (list of objects), or ``{"affectedRows": n}`` for a statement without rows."""
    addresses = resolve_permitted(target.host, target.port, allow, ALLOWED_HOSTS_ENV, "database host")
    ca_file = None
    try:
        if target.ssl and target.ca and target.driver.startswith("postgresql"):
            with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as handle:  # libpq wants a file
                handle.write(target.ca)
            ca_file = handle.name
        for tried, address in enumerate(addresses, 1):  # in resolver order, as drivers do with a name
            try:
                engine, connection = _connect(target, str(address), ca_file)
                break
            except IntegrationError:
                if tried == len(addresses):
                    raise
        dbapi = engine.dialect.loaded_dbapi
        try:
            # The driver's own cursor, without parameters: SQLAlchemy would read ``:word`` in the
            # user's SQL as a bind parameter, and psycopg2 would read ``%`` as a placeholder.
            cursor = connection.cursor()
            cursor.execute(query)
            rows = _fetch(cursor)
            connection.commit()
        except dbapi.Error as exc:
            if _connection_lost(dbapi, connection.dbapi_connection, exc):
                lost = IntegrationError(f"The database connection was lost while the query ran; it is not "
                                        f"repeated automatically: {str(exc)[:500]}")
                lost.retryable = False  # the statement may have run: a write must not happen twice
                raise lost from exc
            raise UserConfigError(f"The query failed: {str(exc).strip()[:1000]}", field="query") from exc
        finally:
            connection.close()
            engine.dispose()
    finally:
        if ca_file:
            os.unlink(ca_file)
    return rows


def run_sql_querier(sessions: Sessions, task: NodeTask) -> NodeOutcome:
    target = target_of(task.data)
    query = as_text(edge_value(task.data, "query")).strip()
    if not query:
        raise UserConfigError("The query is empty.", field="query")
    rows = run_query(target, query, AllowList.from_env(ALLOWED_HOSTS_ENV))
    text = rows_json(rows)
    with sessions() as session:
        persist_node_success(
            session, task, data_updates={"text": text}, output=text, output_type="json",
            metadata={"dbms": target.dbms, "rowCount": len(rows) if isinstance(rows, list) else None},
        )
    return NodeOutcome(task=task, output={"text": text}, message="Node executed successfully")
