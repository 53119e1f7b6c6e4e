"""Typed SQLAlchemy models.

``AppBase`` holds the main API's tables (owned and migrated by the main API; TypeORM camelCase
column names, reference §5) with just the columns the worker touches. ``OwnBase`` holds this
project's own tables (snake_case), migrated by Alembic.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_uuid() -> str:
    return str(uuid.uuid4())


class AppBase(DeclarativeBase):
    pass


class OwnBase(DeclarativeBase):
    pass


# --- main API tables -------------------------------------------------------------------------


class Flow(AppBase):
    __tablename__ = "flows"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), default="")
    userId: Mapped[str | None] = mapped_column(String(64))
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updatedAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class FlowNode(AppBase):
    __tablename__ = "flows_nodes"
    __table_args__ = (UniqueConstraint("flowId", "nodeId"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    nodeId: Mapped[str] = mapped_column(String(255))
    flowId: Mapped[str] = mapped_column(String(36), index=True)
    type: Mapped[str] = mapped_column(String(64))
    positionX: Mapped[float | None] = mapped_column()
    positionY: Mapped[float | None] = mapped_column()
    data: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    extras: Mapped[dict[str, Any] | None] = mapped_column(Json)
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updatedAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class FlowEdge(AppBase):
    __tablename__ = "flows_nodes_edges"
    __table_args__ = (UniqueConstraint("flowId", "edgeId"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    edgeId: Mapped[str] = mapped_column(String(255))
    flowId: Mapped[str] = mapped_column(String(36), index=True)
    source: Mapped[str] = mapped_column(String(255))
    target: Mapped[str] = mapped_column(String(255))
    sourceHandle: Mapped[str | None] = mapped_column(String(64))
    targetHandle: Mapped[str | None] = mapped_column(String(64))
    extras: Mapped[dict[str, Any] | None] = mapped_column(Json)
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updatedAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class FlowVersionHistory(AppBase):
    """A published version of a flow: its nodes (``[{nodeId, type, data}]``, as in ``flows_nodes``)
    and edges (shaped like ``flows_nodes_edges`` rows), frozen when it was published."""

    __tablename__ = "flows_version_history"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    flowId: Mapped[str] = mapped_column(String(36), index=True)
    version: Mapped[int] = mapped_column(Integer)
    nodes: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    edges: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NodeExecution(AppBase):
    __tablename__ = "node_executions"
    __table_args__ = (UniqueConstraint("execId", "nodeId"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    execId: Mapped[str] = mapped_column(String(64), index=True)
    flowId: Mapped[str] = mapped_column(String(36))
    nodeId: Mapped[str] = mapped_column(String(255))
    type: Mapped[str | None] = mapped_column(String(64))
    input: Mapped[dict[str, Any] | None] = mapped_column(Json)
    userId: Mapped[str | None] = mapped_column(String(64))
    sessionId: Mapped[str | None] = mapped_column(String(255))
    flowVersionHistoryId: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str | None] = mapped_column(String(16))
    isError: Mapped[bool] = mapped_column(Boolean, default=False)
    outputData: Mapped[dict[str, Any] | None] = mapped_column(Json)
    output: Mapped[str | None] = mapped_column(Text)
    outputType: Mapped[str | None] = mapped_column(String(32))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", Json)
    runToken: Mapped[str | None] = mapped_column(String(128))
    cancelledAt: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updatedAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ExecutionLog(AppBase):
    __tablename__ = "execution_logs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    nodeId: Mapped[str] = mapped_column(String(255))
    flowId: Mapped[str] = mapped_column(String(36), index=True)
    userId: Mapped[str | None] = mapped_column(String(64))
    sessionId: Mapped[str | None] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)
    errorStack: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", Json)
    isError: Mapped[bool] = mapped_column(Boolean, default=False)
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SystemAiModel(AppBase):
    __tablename__ = "system_ai_models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    modelName: Mapped[str] = mapped_column(String(128), unique=True)
    aiCompany: Mapped[str] = mapped_column(String(64))
    maxOutputToken: Mapped[int | None] = mapped_column(Integer)
    supportsReasoning: Mapped[bool] = mapped_column(Boolean, default=False)
    reasoningAlwaysOn: Mapped[bool] = mapped_column(Boolean, default=False)
    isVisionModel: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class GeneratedFile(AppBase):
    __tablename__ = "generated_files"
    __table_args__ = (UniqueConstraint("storageKey"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    userId: Mapped[str | None] = mapped_column(String(64))
    flowId: Mapped[str | None] = mapped_column(String(36))
    nodeId: Mapped[str | None] = mapped_column(String(255))
    execId: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    fileType: Mapped[str] = mapped_column(String(16))
    storageKey: Mapped[str] = mapped_column(String(512))
    src: Mapped[str] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updatedAt: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# --- this project's tables -------------------------------------------------------------------

TERMINAL_STATUSES = ("completed", "failed", "cancelled")


class PendingExecution(OwnBase):
    """The queue the main API writes to (design §3); one Dagster run per row."""

    __tablename__ = "pending_executions"
    __table_args__ = (Index("ix_pending_executions_status_priority", "status", "priority", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8), default="node")
    exec_id: Mapped[str] = mapped_column(String(64), index=True)
    flow_id: Mapped[str] = mapped_column(String(36))
    node_id: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(255))
    flow_version_history_id: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(64))
    # The client socket that receives the text generator's streamed answer (reference §2.1).
    socket_id: Mapped[str | None] = mapped_column(String(255))
    # A row's own input: the delivery plan of a ``delivery`` row.
    payload: Mapped[dict[str, Any] | None] = mapped_column(Json)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dagster_run_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    launched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TokenLedgerEntry(OwnBase):
    """One row per charged generation; the unique key makes charging exactly-once."""

    __tablename__ = "token_ledger"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    exec_id: Mapped[str] = mapped_column(String(64), index=True)
    flow_id: Mapped[str] = mapped_column(String(36))
    node_id: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    ai_system: Mapped[str] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    # pending: recorded before the main API call; charged: the main API (or local ledger) took it.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # The provider reported no usage: the worker counted the tokens itself.
    estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class StatusNotification(OwnBase):
    """Status notifications: recorded here when no Redis is configured, and kept here (the outbox)
    while a configured Redis is unreachable, until they are published (``published_at``)."""

    __tablename__ = "status_notifications"
    __table_args__ = (Index("ix_status_notifications_unpublished", "published_at", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    room: Mapped[str] = mapped_column(String(255), index=True)
    exec_id: Mapped[str | None] = mapped_column(String(64), index=True)
    node_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str | None] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
