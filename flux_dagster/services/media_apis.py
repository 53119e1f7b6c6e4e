"""Keys and endpoints of the services the media nodes call besides the LLM providers: SearchAPI
(YouTube transcripts) and the image providers. One table, like
``llm.providers.PROVIDERS``: the resource reads it, the nodes look a service up by name."""

from __future__ import annotations

from dataclasses import dataclass, field

from flux_dagster.errors import ProviderError
from flux_dagster.llm.providers import ProviderCredentials


@dataclass(frozen=True)
class MediaApiSpec:
    key_env: str
    base_url_env: str
    default_base_url: str
    label: str  # how errors name the service


MEDIA_APIS: dict[str, MediaApiSpec] = {
    "search_api": MediaApiSpec("SEARCH_API_KEY", "SEARCH_API_BASE_URL", "https://www.searchapi.io/api/v1", "SearchAPI"),
    # Image providers. Gemini's images come from its native API, not the OpenAI-compatible one
    # the text generator uses (GEMINI_BASE_URL); same key.
    "gemini": MediaApiSpec("GENAI_API_KEY", "GEMINI_IMAGES_BASE_URL", "https://generativelanguage.googleapis.com",
                           "Gemini"),
    "fal": MediaApiSpec("FAL_KEY", "FAL_BASE_URL", "https://fal.run", "fal"),
    "stability": MediaApiSpec("STABILITY_API_KEY", "STABILITY_BASE_URL", "https://api.stability.ai", "Stability AI"),
    "ideogram": MediaApiSpec("IDEOGRAM_API_KEY", "IDEOGRAM_BASE_URL", "https://api.ideogram.ai", "Ideogram"),
}


@dataclass(frozen=True)
class MediaApis:
    """``credentials`` maps a service of :data:`MEDIA_APIS` to its key and base URL."""

    credentials: dict[str, ProviderCredentials] = field(default_factory=dict)

    def get(self, name: str) -> ProviderCredentials | None:
        return self.credentials.get(name)

    def require(self, name: str) -> ProviderCredentials:
        creds = self.credentials.get(name)
        if creds is None:
            spec = MEDIA_APIS[name]
            raise ProviderError(f"No API key is configured for {spec.label} ({spec.key_env}).")
        return creds
