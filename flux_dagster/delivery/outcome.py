"""What one delivery ended as, and the failure every channel raises (reference §2.3 classes)."""

from __future__ import annotations

from dataclasses import dataclass

from flux_dagster.errors import FluxError

# sent: delivered now; already_sent: this delivery's own email was confirmed by an earlier run;
# duplicate: another delivery holds or sent the same email; withheld: the callback waits on an
# email that was a duplicate or a Gmail/Microsoft failure; failed: failed for good.
STATUSES = ("sent", "already_sent", "duplicate", "withheld", "failed")


class DeliveryFailure(FluxError):
    """A send that did not go through. ``code`` is what ``/worker/delivery-outcome`` reports
    (``HTTP_429``, ``SMTP_535``, ``EGRESS_REFUSED``…); messages name the host, never the URL path,
    the recipients or the payload."""

    def __init__(self, message: str, *, code: str, retryable: bool, host: str | None = None,
                 status_code: int | None = None, retry_after_s: float | None = None):
        super().__init__(message[:2000])
        self.code = code
        self.retryable = retryable
        self.host = host
        self.status_code = status_code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class DeliveryResult:
    channel: str  # email | callback | api_callback
    delivery_id: str
    node_id: str | None
    status: str
    attempts: int = 1
    error_code: str | None = None
    error_message: str | None = None
    host: str | None = None
    status_code: int | None = None

    def __post_init__(self):
        assert self.status in STATUSES, self.status

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def describe(self) -> str:
        where = f" of node {self.node_id}" if self.node_id else ""
        return f"{self.channel}{where}: {self.status}" + (f" ({self.error_message})" if self.error_message else "")
