"""Where generated files live: S3 in production, a local folder as the embedded default.

Both overwrite on the same key, so a retried or re-executed step replaces its file. Links: S3
gives a presigned GET URL (it expires, ``FLUX_FILES_LINK_EXPIRY_S``); the local folder gives a
``file://`` URI of the absolute path, which opens on the machine that runs the worker.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from flux_dagster.errors import IntegrationError, SystemError_

# SigV4 presigned URLs are valid for at most 7 days.
MAX_LINK_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class StoredObject:
    key: str  # the object's full key in the store (``generated_files.storageKey``)
    src: str  # the link users open


class FileStore(Protocol):
    def save(self, key: str, content: bytes, *, content_type: str, download_name: str) -> StoredObject: ...

    def load(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...


def content_disposition(download_name: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact UTF-8 one (RFC 6266)."""
    fallback = download_name.encode("ascii", "replace").decode("ascii").replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(download_name, safe='')}"


class LocalFileStore:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise SystemError_("A file key points outside the file store.", dev_message=key)
        return path

    def load(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise SystemError_(f"The file store has no {key}.")
        return path.read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def save(self, key: str, content: bytes, *, content_type: str, download_name: str) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, and a re-run replaces it whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key=key, src=path.as_uri())


class S3FileStore:
    def __init__(self, *, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 session_token: str | None = None, link_expiry_s: int = MAX_LINK_EXPIRY_S):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.link_expiry_s = max(1, min(int(link_expiry_s), MAX_LINK_EXPIRY_S))
        self._client_args: dict[str, Any] = dict(
            endpoint_url=endpoint_url, region_name=region or "us-east-1", aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, aws_session_token=session_token,
        )
        self._path_style = endpoint_url is not None  # MinIO, LocalStack and moto serve buckets by path

    def _client(self):
        import boto3  # heavy: only workers that store files on S3 pay for it
        from botocore.config import Config

        config = Config(
            signature_version="s3v4", connect_timeout=10, read_timeout=60,
            # Dagster's RetryPolicy retries the step; botocore only smooths over a blip.
            retries={"mode": "standard", "max_attempts": 2},
            s3={"addressing_style": "path" if self._path_style else "auto"},
        )
        return boto3.client("s3", config=config, **self._client_args)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """S3 failures as the error classes: 5xx and throttling retryable, configuration not."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        try:
            yield
        except (ConnectionError, HTTPClientError) as exc:
            raise IntegrationError("The file store could not be reached.", dev_message=f"S3: {exc}") from exc
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = exc.response.get("Error", {}).get("Code", "")
            transient = status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
            raise (IntegrationError if transient else SystemError_)(
                f"The file store refused {what}.", dev_message=f"S3 {code} ({status}): {exc}"
            ) from exc
        except BotoCoreError as exc:  # missing credentials, bad region…: configuration, not transient
            raise SystemError_("The file store is misconfigured.", dev_message=f"S3: {exc}") from exc

    def save(self, key: str, content: bytes, *, content_type: str, download_name: str) -> StoredObject:
        full_key = f"{self.prefix}/{key}" if self.prefix else key
        with self._errors("the generated file"):
            client = self._client()
            client.put_object(Bucket=self.bucket, Key=full_key, Body=content, ContentType=content_type,
                              ContentDisposition=content_disposition(download_name))
            src = client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full_key}, ExpiresIn=self.link_expiry_s
            )
        return StoredObject(key=full_key, src=src)

    # Objects other services put in the bucket (delivery plans): full keys, no prefix added.
    def load(self, key: str) -> bytes:
        with self._errors(f"reading {key}"):
            return self._client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key}"):
            self._client().delete_object(Bucket=self.bucket, Key=key)  # a missing key is no error
