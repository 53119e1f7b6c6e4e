"""The delivery plan of a finished run (reference §2.3) and the rules that turn it into deliveries.

The main API writes one ``pending_executions`` row of kind ``delivery`` per run; its ``payload``
is the plan itself (up to 256 KB) or ``{"planKey": "delivery-plans/…"}`` naming the plan's JSON in
the file store's S3 bucket. The schema (camelCase, as the main API writes it) is documented in
docs/deliveries.md; :func:`planned_deliveries` applies the reference's rules to it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flux_dagster.errors import UserConfigError
from flux_dagster.files.store import FileStore

PLAN_KEY_PREFIX = "delivery-plans/"

RunStatus = Literal["finished", "failed", "cancelled", "budget_stopped"]
Sender = Literal["smtp", "gmail", "microsoft"]
Channel = Literal["email", "callback", "api_callback"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Attachment(_Model):
    name: str
    url: str  # http(s); downloaded through the egress guard


class Email(_Model):
    enabled: bool = True
    sender: Sender = "smtp"  # gmail/microsoft: the user's connected account (not supported here)
    to: list[str] = Field(min_length=1)
    cc: list[str] = []
    bcc: list[str] = []
    subject: str = ""
    text: str = ""
    html: str | None = None
    attachments: list[Attachment] = []


class Callback(_Model):
    url: str  # the node's ``callbackUrl`` (or ``callbackUrlInputData``): any value, checked at send time
    body: dict[str, Any] | None = None  # sent as is; None: the worker's default body


class OutputNode(_Model):
    nodeId: str = Field(min_length=1)
    label: str | None = None
    ran: bool = True  # False: the run failed before this node ran
    batchRow: int | None = None  # a batch run delivers once per row
    output: str | None = None
    email: Email | None = None
    callback: Callback | None = None


class ApiCallback(_Model):
    url: str
    body: dict[str, Any]  # the API v2 consolidated result, as GET /flux/executions/:id answers it


class DeliveryPlan(_Model):
    version: Literal[1] = 1
    flowId: str = Field(min_length=1)
    runLogProcessId: str = Field(min_length=1)  # the run's log id: scope of the email dedup key
    runStatus: RunStatus
    runType: str = "canvas"  # reported to /worker/delivery-outcome
    batch: bool = False
    subFlow: bool = False  # a sub-flow call (Library or flow-caller node) has its own runLogProcessId
    outputNodes: list[OutputNode] = []
    apiCallback: ApiCallback | None = None


@dataclass(frozen=True)
class NodeDelivery:
    """What one output node sends: its email (if any) first, then its callback (if any)."""

    flow_id: str
    run_log_process_id: str
    run_status: str
    node_id: str
    label: str | None
    batch_row: int | None
    output: str | None
    email: Email | None
    callback: Callback | None

    @property
    def mapping_key(self) -> str:
        """A Dagster mapping key: node ids may hold any character; the hash keeps keys unique."""
        raw = self.node_id if self.batch_row is None else f"{self.node_id}#{self.batch_row}"
        safe = re.sub(r"[^A-Za-z0-9_]", "_", raw)[:40]
        return f"{safe}_{hashlib.sha256(raw.encode()).hexdigest()[:8]}"

    def delivery_id(self, channel: Channel) -> str:
        return delivery_id(self.flow_id, self.run_log_process_id, channel, self.node_id, self.batch_row)


@dataclass(frozen=True)
class PlanSummary:
    """The plan's run-level part, handed to the steps after the node deliveries."""

    pending_execution_id: int
    user_id: str
    flow_id: str
    run_log_process_id: str
    run_status: str
    run_type: str
    plan_key: str | None  # the S3 object to delete when the job ends
    api_callback: ApiCallback | None
    skipped_reason: str | None = None

    def delivery_id(self) -> str:
        return delivery_id(self.flow_id, self.run_log_process_id, "api_callback", None, None)


def delivery_id(flow_id: str, scope: str, channel: str, node_id: str | None, batch_row: int | None) -> str:
    """``X-FluxPrompt-Delivery-Id``: the same for every retry and re-execution of one delivery,
    different for every other delivery."""
    raw = json.dumps([flow_id, scope, channel, node_id, batch_row])
    return "dlv_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def parse_plan(raw: Any) -> DeliveryPlan:
    try:
        return DeliveryPlan.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'plan'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise UserConfigError(f"The delivery plan is malformed: {problems}"[:2000]) from exc


def plan_key_of(payload: Any) -> str | None:
    """The S3 key when the row's payload points at the plan, else None (the plan is inline)."""
    if not isinstance(payload, dict) or "planKey" not in payload:
        return None
    key = payload["planKey"]
    # Only plan objects: a bad row must not make the worker read or delete anything else.
    if not isinstance(key, str) or not key.startswith(PLAN_KEY_PREFIX) or ".." in key:
        raise UserConfigError(f"The delivery plan key must start with {PLAN_KEY_PREFIX!r}.")
    return key


def read_plan(payload: Any, store: FileStore) -> tuple[DeliveryPlan, str | None]:
    """The row's plan, inline or from the file store; and the S3 key to delete at the end."""
    if payload is None:
        raise UserConfigError("The delivery row has no plan (pending_executions.payload is empty).")
    key = plan_key_of(payload)
    if key is None:
        return parse_plan(payload), None
    try:
        raw = json.loads(store.load(key))
    except ValueError as exc:
        raise UserConfigError(f"The delivery plan {key} is not JSON: {exc}"[:2000]) from exc
    return parse_plan(raw), key


def planned_deliveries(plan: DeliveryPlan) -> tuple[list[NodeDelivery], ApiCallback | None, str | None]:
    """The reference's rules: (node deliveries, API v2 callback, why nothing is sent or None).

    - cancelled or budget-stopped run: nothing;
    - batch run or sub-flow run: no email, the callback once per row / sub-run;
    - failed run: output nodes that ran deliver normally; a node that did not run sends only its
      email, and only when it carries attachments (its text is empty: it was reset at run start);
    - otherwise: the email when it is on, the callback when a URL is set.
    """
    if plan.runStatus in ("cancelled", "budget_stopped"):
        return [], None, f"Run {plan.runStatus.replace('_', '-')}: nothing is delivered."
    deliveries = []
    for node in plan.outputNodes:
        email = node.email if node.email is not None and node.email.enabled else None
        if plan.batch or plan.subFlow:
            email = None
        callback = node.callback if node.callback is not None and node.callback.url.strip() else None
        if not node.ran:
            callback = None
            email = email.model_copy(update={"text": "", "html": None}) if email and email.attachments else None
        if email is None and callback is None:
            continue
        deliveries.append(NodeDelivery(
            flow_id=plan.flowId, run_log_process_id=plan.runLogProcessId, run_status=plan.runStatus,
            node_id=node.nodeId, label=node.label, batch_row=node.batchRow,
            output=node.output if node.ran else None, email=email, callback=callback,
        ))
    keys = [d.mapping_key for d in deliveries]
    if len(set(keys)) != len(keys):
        raise UserConfigError("The delivery plan lists the same output node (and batch row) twice.")
    return deliveries, plan.apiCallback, None
