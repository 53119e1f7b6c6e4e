"""A real SMTP server on loopback (aiosmtpd): AUTH LOGIN/PLAIN without TLS, records every
message; ``refuse`` lists recipients it answers 550; ``fail_next`` holds SMTP replies (``"451 4.3.0 try later"``) given to the next DATA
commands instead of accepting them."""

from __future__ import annotations

import email
import email.policy
import socket
from dataclasses import dataclass, field
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage


@dataclass
class FakeSmtp:
    user: str = "mailer"
    password: str = "secret"
    messages: list[Received] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # recipients answered 550

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == self.user \
            and auth_data.password.decode() == self.password
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.refuse:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        if self.fail_next:
            return self.fail_next.pop(0)
        parsed = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 2.0.0 OK queued"

    def __enter__(self) -> "FakeSmtp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, authenticator=self._authenticate,
                                     auth_require_tls=False)
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()
