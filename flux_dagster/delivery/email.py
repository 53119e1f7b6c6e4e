"""Output emails over SMTP (Python's ``smtplib``), reference §2.3.

Retryable: connection errors, timeouts and the SMTP codes 421, 450, 451, 452. Not retryable:
authentication failures (530, 534, 535) and every other refusal. Sending from a user's connected
Gmail or Microsoft account is not supported by this worker. Without ``EMAIL_HOST`` the message is
written as an ``.eml`` file under ``$FLUX_HOME/emails`` (the embedded default).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import httpx

from flux_dagster.delivery.egress import EgressPolicy, guarded_request, parse_url, retryable_status
from flux_dagster.delivery.outcome import DeliveryFailure
from flux_dagster.delivery.plan import Email
from flux_dagster.nodes.netguard import http_client

RETRYABLE_SMTP_CODES = frozenset({421, 450, 451, 452})
SMTP_TIMEOUT_S = 120.0  # per SMTP command: the reference's 2 min per attempt
ATTACHMENT_TIMEOUT_S = 30.0
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024  # all attachments of one email; most servers take 25 MB


@dataclass(frozen=True)
class SmtpSettings:
    host: str | None
    port: int
    user: str | None
    password: str | None
    from_address: str
    outbox_dir: Path  # used when no host is set


def _smtp_failure(code: int, detail: str, host: str) -> DeliveryFailure:
    return DeliveryFailure(f"The SMTP server {host} refused the email ({code} {detail[:200]}).",
                           code=f"SMTP_{code}", retryable=code in RETRYABLE_SMTP_CODES, host=host)


def _read_capped(url: httpx.URL, budget: int) -> Callable[[httpx.Response], tuple[bytes, str | None]]:
    def read(response: httpx.Response) -> tuple[bytes, str | None]:
        status = response.status_code
        if status != 200:
            raise DeliveryFailure(f"The attachment at {url.host} answered HTTP {status}.",
                                  code=f"ATTACHMENT_HTTP_{status}", host=url.host, status_code=status,
                                  retryable=retryable_status(status))
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > budget:  # stop reading: the cap holds whatever the server sends
                raise DeliveryFailure(f"The attachments exceed {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MB.",
                                      code="ATTACHMENT_TOO_LARGE", retryable=False)
            chunks.append(chunk)
        return b"".join(chunks), response.headers.get("content-type")

    return read


def fetch_attachments(email: Email, policy: EgressPolicy) -> list[tuple[str, bytes, str]]:
    """(file name, content, MIME type) of each attachment, downloaded under the egress guard."""
    files, total = [], 0
    with http_client(timeout_s=ATTACHMENT_TIMEOUT_S) as client:
        for attachment in email.attachments:
            url = parse_url(attachment.url, "attachment URL")
            try:
                content, content_type = guarded_request(client, "GET", url, policy,
                                                        _read_capped(url, MAX_ATTACHMENT_BYTES - total))
            except httpx.HTTPError as exc:
                raise DeliveryFailure(f"The attachment at {url.host} could not be downloaded ({type(exc).__name__}).",
                                      code="ATTACHMENT_CONNECTION", retryable=True, host=url.host) from exc
            total += len(content)
            mime = (content_type or mimetypes.guess_type(attachment.name)[0] or "application/octet-stream")
            files.append((attachment.name, content, mime.split(";")[0].strip()))
    return files


def build_message(email: Email, settings: SmtpSettings, delivery_id: str,
                  attachments: list[tuple[str, bytes, str]]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.from_address
    message["To"] = ", ".join(email.to)
    if email.cc:
        message["Cc"] = ", ".join(email.cc)
    message["Subject"] = email.subject
    message["Message-ID"] = make_msgid(idstring=delivery_id)
    message["X-FluxPrompt-Delivery-Id"] = delivery_id
    message.set_content(email.text or "")
    if email.html:
        message.add_alternative(email.html, subtype="html")
    for name, content, mime in attachments:
        maintype, _, subtype = mime.partition("/")
        message.add_attachment(content, maintype=maintype or "application", subtype=subtype or "octet-stream",
                               filename=name)
    return message


def send_email(email: Email, settings: SmtpSettings, delivery_id: str, policy: EgressPolicy) -> dict[str, str]:
    """Send once; returns the recipients the server refused while accepting the others."""
    if email.sender != "smtp":
        raise DeliveryFailure(
            f"Sending email from a connected {email.sender.capitalize()} account is not supported by this "
            "worker; use the SMTP sender.", code="SENDER_NOT_SUPPORTED", retryable=False)
    message = build_message(email, settings, delivery_id, fetch_attachments(email, policy))
    recipients = [*email.to, *email.cc, *email.bcc]
    if not settings.host:
        settings.outbox_dir.mkdir(parents=True, exist_ok=True)
        (settings.outbox_dir / f"{delivery_id}.eml").write_bytes(bytes(message))
        return {}
    host = settings.host
    try:
        smtp_class = smtplib.SMTP_SSL if settings.port == 465 else smtplib.SMTP
        with smtp_class(host, settings.port, timeout=SMTP_TIMEOUT_S) as smtp:
            smtp.ehlo()
            if smtp_class is smtplib.SMTP and smtp.has_extn("starttls"):
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if settings.user:
                smtp.login(settings.user, settings.password or "")
            refused = smtp.send_message(message, to_addrs=recipients)
    except smtplib.SMTPRecipientsRefused as exc:  # every recipient refused
        codes = {code for code, _ in exc.recipients.values()}
        code = min(codes) if codes <= RETRYABLE_SMTP_CODES else max(codes - RETRYABLE_SMTP_CODES)
        raise _smtp_failure(code, "recipients refused", host) from exc
    except smtplib.SMTPResponseException as exc:  # auth (530/534/535), sender refused, data refused…
        raise _smtp_failure(exc.smtp_code, exc.smtp_error.decode(errors="replace")
                            if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error), host) from exc
    except smtplib.SMTPNotSupportedError as exc:  # e.g. EMAIL_USER set, the server offers no AUTH
        raise DeliveryFailure(f"The SMTP server {host} does not support this: {exc}"[:500],
                              code="SMTP_NOT_SUPPORTED", retryable=False, host=host) from exc
    except (smtplib.SMTPException, OSError) as exc:  # disconnected, refused, timeout, TLS
        raise DeliveryFailure(f"The SMTP server {host} could not be reached ({type(exc).__name__}).",
                              code="SMTP_CONNECTION", retryable=True, host=host) from exc
    return {address: f"{code}" for address, (code, _msg) in refused.items()}
