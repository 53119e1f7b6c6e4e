"""The ``file_store`` resource: S3 when ``FLUX_FILES_BUCKET`` is set, else a local folder."""

# No ``from __future__ import annotations`` here: Dagster reads these annotations at runtime.

from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, EnvVar

from flux_dagster import settings
from flux_dagster.files.store import MAX_LINK_EXPIRY_S, FileStore, LocalFileStore, S3FileStore


class FileStoreResource(ConfigurableResource):
    """Generated files. With ``bucket``: S3 (``endpoint_url`` for S3-compatible servers; no keys
    means boto3's own credential chain, e.g. an instance role). Without: ``local_root``, by default
    ``<FLUX_HOME>/files``."""

    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    link_expiry_s: int = MAX_LINK_EXPIRY_S
    local_root: str | None = None

    def store(self) -> FileStore:
        if self.bucket:
            return S3FileStore(
                bucket=self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url, region=self.region,
                access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
                session_token=self.session_token, link_expiry_s=self.link_expiry_s,
            )
        return LocalFileStore(Path(self.local_root) if self.local_root else settings.flux_home() / "files")


def _secret(name: str) -> Any:
    """``EnvVar`` for a variable that is set, so the value never enters run config."""
    return EnvVar(name) if settings.env(name) else None


def file_store_from_env() -> FileStoreResource:
    return FileStoreResource(
        bucket=settings.env("FLUX_FILES_BUCKET"),
        prefix=settings.env("FLUX_FILES_PREFIX", ""),
        endpoint_url=settings.env("S3_ENDPOINT_URL"),
        region=settings.env("AWS_REGION"),
        access_key_id=_secret("AWS_ACCESS_KEY_ID"),
        secret_access_key=_secret("AWS_SECRET_ACCESS_KEY"),
        session_token=_secret("AWS_SESSION_TOKEN"),
        link_expiry_s=int(settings.env("FLUX_FILES_LINK_EXPIRY_S", str(MAX_LINK_EXPIRY_S))),
    )
