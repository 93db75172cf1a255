"""``mailsync mailbox test``: can this node log in, find its folders, and mail itself?

Each step says exactly what works and what does not; the probe message
(sent to the node's own address) is removed again once it arrived.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailsync.errors import MailsyncError
from mailsync.node import Node
from mailsync.transport import open_receiver, open_sender

PROBE_HEADER = "X-Mailsync-Probe"


@dataclass(frozen=True)
class Check:
    step: str
    ok: bool
    detail: str


def check_mailbox(
    node: Node, *, wait_s: float = 60.0, clock: Callable[[], float] = time.monotonic
) -> list[Check]:
    box = node.config.mailbox
    ctx = node.transport_context()
    results: list[Check] = []

    def attempt(step: str, fn: Callable[[], str]) -> bool:
        try:
            results.append(Check(step, True, fn()))
            return True
        except MailsyncError as exc:
            results.append(Check(step, False, str(exc) + (f" — {exc.hint}" if exc.hint else "")))
            return False

    def receive_login() -> str:
        with open_receiver(box.receive, ctx):
            if box.receive.lower().startswith("pop3"):
                return f"logged in to {box.receive} (POP3: mail is deleted once applied)"
            return f"logged in to {box.receive}; folders ready"

    def send_login() -> str:
        with open_sender(box.send, ctx):
            return f"connected to {box.send}"

    received = attempt("receive", receive_login)
    sent_ok = attempt("send", send_login)
    if not (received and sent_ok):
        return results
    token = secrets.token_hex(8)
    probe = (
        f"From: {box.address}\r\nTo: {box.address}\r\nSubject: mailsync mailbox test {token}\r\n"
        f"{PROBE_HEADER}: {token}\r\n\r\nA test message from `mailsync mailbox test`; "
        "it removes it again.\r\n"
    ).encode()

    def send_probe() -> str:
        with open_sender(box.send, ctx) as tx:
            tx.send(box.address, box.address, probe)
        return f"sent a test message to {box.address}"

    if not attempt("send to self", send_probe):
        return results

    def await_probe() -> str:
        deadline = clock() + wait_s
        while True:
            with open_receiver(box.receive, ctx) as rx:
                for msg in rx.fetch():
                    if token.encode() in msg.raw[:4096]:
                        rx.processed(msg.id)
                        return f"the test message arrived and was removed ({box.receive})"
            if clock() > deadline:
                raise MailsyncError(
                    f"the test message did not arrive in {wait_s:.0f} s",
                    hint="check that the address receives mail into this mailbox",
                )
            time.sleep(0.5)

    attempt("receive from self", await_probe)
    return results
