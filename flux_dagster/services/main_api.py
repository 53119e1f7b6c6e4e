"""The main API's ``/worker/*`` endpoints (reference §3.3, §3.5), or the same logic done locally
against the app DB when ``URL_MAIN_API`` is unset."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from flux_dagster.db.engine import session_scope
from flux_dagster.db.models import ExecutionLog, SystemAiModel, TokenLedgerEntry
from flux_dagster.errors import IntegrationError, SystemError_, UserConfigError, retry_after_of

# Node data says ``anthropicai``/``perplexityai``; the model registry says ``anthropic``/``perplexity``.
AI_SYSTEM_TO_COMPANY = {"anthropicai": "anthropic", "perplexityai": "perplexity"}


def company_of(ai_system: str) -> str:
    return AI_SYSTEM_TO_COMPANY.get(ai_system.lower(), ai_system.lower())


@dataclass(frozen=True)
class TokenCharge:
    flow_id: str
    user_id: str
    exec_id: str
    node_id: str | None
    model: str
    ai_system: str
    input_tokens: int
    output_tokens: int
    generation_id: str
    label: str | None = None
    estimated: bool = False  # no usage was reported: the tokens were counted

    @property
    def idempotency_key(self) -> str:
        """Same on every retry and re-execution of one generation, different for another one."""
        raw = f"{self.exec_id}|{self.node_id or ''}|{self.generation_id}"
        return "charge-" + hashlib.sha256(raw.encode()).hexdigest()[:40]


@dataclass
class MainApi:
    database_url: str
    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 30.0

    def _post(self, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
        try:
            return httpx.post(
                f"{self.url.rstrip('/')}{path}",
                json=body,
                headers={"internal-api-key": self.api_key or "", **(headers or {})},
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise IntegrationError(f"The main API could not be reached ({path}).", dev_message=repr(exc)) from exc

    def validate_model_access(self, flow_id: str, model: str, ai_system: str) -> None:
        """Raises UserConfigError when the flow's owner may not use the model."""
        if self.url:
            response = self._post("/worker/validate-model-access", {"flowId": flow_id, "model": model, "aiSystem": ai_system})
            if response.status_code == 403:
                raise UserConfigError(_message(response) or f"You do not have access to the model {model}.")
            if response.status_code >= 400:
                raise _http_error("Model access check", response)
            if not response.json().get("success", False):
                raise UserConfigError(_message(response) or f"You do not have access to the model {model}.")
            return
        with session_scope(self.database_url) as session:
            row = session.scalar(select(SystemAiModel).where(SystemAiModel.modelName == model))
        if row is None or not row.active:
            raise UserConfigError(f"The model {model} is not available.")
        if row.aiCompany.lower() != company_of(ai_system):
            raise UserConfigError(f"The model {model} is not offered by {ai_system}.")

    def charge_tokens(self, charge: TokenCharge) -> bool:
        """Charge one generation exactly once; returns False when billing refused it."""
        key = charge.idempotency_key
        with session_scope(self.database_url) as session:
            entry = session.scalar(select(TokenLedgerEntry).where(TokenLedgerEntry.idempotency_key == key))
            if entry is not None and entry.state == "charged":
                return True
            if entry is None:
                try:
                    with session.begin_nested():
                        session.add(_ledger_entry(charge, key, "pending" if self.url else "charged"))
                except IntegrityError:  # a concurrent attempt recorded it first
                    return True
                if not self.url:
                    return True
        body = {
            "flowId": charge.flow_id, "userId": charge.user_id, "inputTokens": charge.input_tokens,
            "outputTokens": charge.output_tokens, "model": charge.model, "aiSystem": charge.ai_system,
            "execId": charge.exec_id, "nodeId": charge.node_id, "label": charge.label,
            "usedTokens": charge.input_tokens + charge.output_tokens, "idempotencyKey": key,
            **({"estimated": True} if charge.estimated else {}),
        }
        response = self._post("/worker/charge-tokens", body, headers={"Idempotency-Key": key})
        if _transient(response.status_code):
            raise _http_error("Charging tokens", response)
        charged = response.status_code < 400 and bool(response.json().get("success", False))
        if charged:
            with session_scope(self.database_url) as session:
                entry = session.scalar(select(TokenLedgerEntry).where(TokenLedgerEntry.idempotency_key == key))
                entry.state = "charged"
        return charged

    def report_delivery_failures(self, user_id: str, reports: list[dict]) -> None:
        """``/worker/delivery-outcome`` once per delivery that failed for good: the main API writes
        a "Delivery failed" row in the flow's log. Each call carries ``Idempotency-Key`` (the
        delivery id), so a retried step's repeats can be dropped. Without ``URL_MAIN_API`` the same
        rows go to ``execution_logs`` (all in one transaction)."""
        if not self.url:
            with session_scope(self.database_url) as session:
                for report in reports:
                    session.add(ExecutionLog(
                        nodeId=report["nodeId"] or "", flowId=report["flowId"], userId=user_id, isError=True,
                        message=f"Delivery failed: {report['channel']} ({report['lastErrorMessage']})"[:2000],
                        metadata_=report,
                    ))
            return
        for report in reports:
            response = self._post("/worker/delivery-outcome", report,
                                  headers={"Idempotency-Key": f"{report['deliveryId']}-outcome"})
            if response.status_code >= 500 or response.status_code in (408, 429):
                raise IntegrationError(f"Reporting a failed delivery failed (HTTP {response.status_code}).",
                                       dev_message=response.text[:500])
            if response.status_code >= 400:
                raise SystemError_(f"The main API refused the delivery outcome (HTTP {response.status_code}).",
                                   dev_message=response.text[:500])


def _ledger_entry(charge: TokenCharge, key: str, state: str) -> TokenLedgerEntry:
    fields = asdict(charge)
    return TokenLedgerEntry(
        idempotency_key=key, exec_id=fields["exec_id"], flow_id=fields["flow_id"], node_id=fields["node_id"],
        user_id=fields["user_id"], model=fields["model"], ai_system=fields["ai_system"],
        input_tokens=fields["input_tokens"], output_tokens=fields["output_tokens"], state=state,
        estimated=fields["estimated"],
    )


def _transient(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _http_error(what: str, response: httpx.Response) -> IntegrationError | UserConfigError:
    """5xx, 408, 425 and 429 are the main API's trouble (retried, honouring Retry-After); another 4xx
    is a request it will never accept (not retried)."""
    if not _transient(response.status_code):
        return UserConfigError(f"{what} was refused by the main API (HTTP {response.status_code}).",
                               dev_message=response.text[:500])
    error = IntegrationError(f"{what} failed (HTTP {response.status_code}).", dev_message=response.text[:500])
    error.retry_after_s = retry_after_of(response.headers)
    return error


def _message(response: httpx.Response) -> str | None:
    try:
        return response.json().get("message")
    except ValueError:
        return None
