"""The ``delivery`` resource: SMTP settings, the Redis of the email dedup keys, the egress mode."""

# No ``from __future__ import annotations`` here: Dagster reads these annotations at runtime.

from typing import Any

from dagster import ConfigurableResource, EnvVar

from flux_dagster import settings
from flux_dagster.delivery.dedup import EmailDedup
from flux_dagster.delivery.egress import ALLOWED_HOSTS_ENV, EGRESS_MODES, EgressPolicy
from flux_dagster.delivery.email import SmtpSettings
from flux_dagster.nodes.netguard import AllowList


class DeliveryResource(ConfigurableResource):
    """SMTP when ``email_host`` is set, else ``.eml`` files under ``<FLUX_HOME>/emails``; email
    dedup keys in Redis when ``redis_url`` is set (without it emails are not deduplicated)."""

    email_host: str | None = None
    email_port: int = 587
    email_user: str | None = None
    email_password: str | None = None
    email_from_address: str = "FluxPrompt <no-reply@fluxprompt.local>"
    redis_url: str | None = None
    egress_mode: str = "report"

    def smtp(self) -> SmtpSettings:
        return SmtpSettings(host=self.email_host, port=self.email_port, user=self.email_user,
                            password=self.email_password, from_address=self.email_from_address,
                            outbox_dir=settings.flux_home() / "emails")

    def dedup(self) -> EmailDedup | None:
        return EmailDedup(self.redis_url) if self.redis_url else None

    def egress(self) -> EgressPolicy:
        mode = (self.egress_mode or "report").lower()
        if mode not in EGRESS_MODES:
            raise ValueError(f"EGRESS_POLICY_MODE must be one of {', '.join(EGRESS_MODES)}, not {mode!r}.")
        allow = AllowList.from_env(ALLOWED_HOSTS_ENV)
        return EgressPolicy(allow.hosts, allow.networks, mode)


def _secret(name: str) -> Any:
    return EnvVar(name) if settings.env(name) else None


def delivery_from_env() -> DeliveryResource:
    fields: dict[str, Any] = {
        "email_host": settings.env("EMAIL_HOST"),
        "email_port": int(settings.env("EMAIL_PORT", "587")),
        "email_user": settings.env("EMAIL_USER"),
        "email_password": _secret("EMAIL_PASSWORD"),
        "email_from_address": settings.env("EMAIL_FROM_ADDRESS"),
        "redis_url": _secret("REDIS_URL"),
        "egress_mode": settings.env("EGRESS_POLICY_MODE"),
    }
    return DeliveryResource(**{k: v for k, v in fields.items() if v is not None})
