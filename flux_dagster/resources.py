"""Dagster resources: each built once per process (``built_once``), each picking production or the
embedded default from the environment. Secrets are named by ``EnvVar`` and read from the
environment of the process that runs the ops: never run config, tags or the UI."""


import os
from contextlib import AbstractContextManager
from typing import Any

from dagster import ConfigurableResource, EnvVar, ResourceDefinition
from sqlalchemy.orm import Session

from flux_dagster import settings
from flux_dagster.db.engine import session_scope
from flux_dagster.delivery.resource import delivery_from_env
from flux_dagster.files.resource import file_store_from_env
from flux_dagster.llm.providers import PROVIDERS, LlmClient, ProviderCredentials
from flux_dagster.scripting.resource import ScriptRunnerResource
from flux_dagster.services.main_api import MainApi
from flux_dagster.services.media_apis import MEDIA_APIS, MediaApis
from flux_dagster.services.notifications import Notifier


class AppDatabase(ConfigurableResource):
    """The app DB (``FLUX_DATABASE_URL``; SQLite file by default)."""

    url: str

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.url)


# The app DB's URL is a plain field of the resources that need it, not a nested AppDatabase:
# built_once reads a resource's own EnvVar fields, not those of a resource nested in it.
class MainApiResource(ConfigurableResource):
    """``/worker/*`` over HTTP when ``URL_MAIN_API`` is set, else the same checks locally."""

    database_url: str
    url: str | None = None
    api_key: str | None = None

    def client(self) -> MainApi:
        return MainApi(database_url=self.database_url, url=self.url, api_key=self.api_key)


class NotifierResource(ConfigurableResource):
    """Redis pub/sub when ``REDIS_URL`` is set, else the ``status_notifications`` table."""

    database_url: str
    redis_url: str | None = None
    channel: str = "room_status_updated"
    stream_channel: str = "node_output_stream"

    def client(self) -> Notifier:
        return Notifier(database_url=self.database_url, redis_url=self.redis_url, channel=self.channel,
                        stream_channel=self.stream_channel)


class LlmResource(ConfigurableResource):
    """LLM providers; offline (deterministic, labelled) when no provider key is configured."""

    offline: bool = True
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    groq_api_key: str | None = None
    groq_base_url: str | None = None
    xai_api_key: str | None = None
    xai_base_url: str | None = None
    perplexity_api_key: str | None = None
    perplexity_base_url: str | None = None
    gemini_api_key: str | None = None
    gemini_base_url: str | None = None
    timeout_s: float = 120.0

    def client(self) -> LlmClient:
        credentials = {}
        for company, spec in PROVIDERS.items():
            key = getattr(self, f"{company}_api_key")
            if key:
                base_url = getattr(self, f"{company}_base_url") or spec.default_base_url
                credentials[company] = ProviderCredentials(api_key=key, base_url=base_url)
        return LlmClient(credentials=credentials, offline=self.offline, timeout_s=self.timeout_s)


class MediaApisResource(ConfigurableResource):
    """Keys and base URLs of the media nodes' services (``services/media_apis.py``); a service
    without a key is simply absent."""

    search_api_key: str | None = None
    search_api_base_url: str | None = None
    gemini_key: str | None = None
    gemini_base_url: str | None = None
    fal_key: str | None = None
    fal_base_url: str | None = None
    stability_key: str | None = None
    stability_base_url: str | None = None
    ideogram_key: str | None = None
    ideogram_base_url: str | None = None

    def client(self) -> MediaApis:
        credentials = {}
        for name, spec in MEDIA_APIS.items():
            key = getattr(self, f"{name}_key")
            if key:
                credentials[name] = ProviderCredentials(api_key=key,
                                                        base_url=getattr(self, f"{name}_base_url") or spec.default_base_url)
        return MediaApis(credentials)


def _env(name: str) -> Any:
    """``EnvVar`` for a variable that is set (secrets stay out of config), else None."""
    return EnvVar(name) if settings.env(name) else None


def build_resources() -> dict[str, ConfigurableResource]:
    database = AppDatabase(url=_env("FLUX_DATABASE_URL") or settings.database_url())
    llm_fields: dict[str, Any] = {}
    for company, spec in PROVIDERS.items():
        llm_fields[f"{company}_api_key"] = _env(spec.key_env)
        llm_fields[f"{company}_base_url"] = settings.env(spec.base_url_env)
    has_key = any(llm_fields[f"{c}_api_key"] for c in PROVIDERS)
    mode = (settings.env("FLUX_LLM_MODE") or "auto").lower()
    offline = mode == "offline" or (mode == "auto" and not has_key)
    return {
        "app_db": database,
        "main_api": MainApiResource(
            database_url=database.url, url=settings.env("URL_MAIN_API"), api_key=_env("INTERNAL_API_KEY")
        ),
        "notifier": NotifierResource(
            database_url=database.url,
            redis_url=_env("REDIS_URL"),
            channel=os.environ.get("FLUX_STATUS_CHANNEL", "room_status_updated"),
            stream_channel=os.environ.get("FLUX_STREAM_CHANNEL", "node_output_stream"),
        ),
        "llm": LlmResource(offline=offline, **{k: v for k, v in llm_fields.items() if v is not None}),
        "script_runner": ScriptRunnerResource.from_env(),
        "file_store": file_store_from_env(),
        "media_apis": MediaApisResource(**{k: v for k, v in _media_api_fields().items() if v is not None}),
        "delivery_settings": delivery_from_env(),
    }


def built_once(resources: dict[str, ConfigurableResource]) -> dict[str, ResourceDefinition]:
    """The resources as ``Definitions`` takes them: each built once per process and handed to every
    run as it is. Dagster would otherwise build every ``ConfigurableResource`` anew at the start of
    each run (25–45 ms and ~10 % of a text node's CPU, ``bench/warm_run.py``); none of these has
    set-up or teardown of its own. ``EnvVar`` fields are read here, in the process that runs the
    ops (the code server, the run hosts); the UI shows each resource's other settings in its
    description and names the variables its secrets come from, never their values."""
    out: dict[str, ResourceDefinition] = {}
    for key, resource in resources.items():
        values = {name: getattr(resource, name) for name in type(resource).model_fields}
        secrets = {name: value for name, value in values.items() if isinstance(value, EnvVar)}
        shown = ", ".join(f"{name}={value!r}" for name, value in values.items()
                          if name not in secrets and value is not None)
        description = f"{type(resource).__name__}({shown})"
        if secrets:
            description += "; from the environment: " + ", ".join(sorted(str(v.env_var_name) for v in secrets.values()))
        resolved = resource.model_copy(update={name: value.get_value() for name, value in secrets.items()})
        out[key] = ResourceDefinition.hardcoded_resource(resolved, description)
    return out


def _media_api_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, spec in MEDIA_APIS.items():
        fields[f"{name}_key"] = _env(spec.key_env)
        fields[f"{name}_base_url"] = settings.env(spec.base_url_env)
    return fields
