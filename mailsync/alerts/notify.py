"""Telling a person: the check after a cycle, the once-a-day rule, the mail.

After a cycle :class:`Watcher` checks the conditions (:mod:`.conditions`)
at most once every ``every_minutes`` in one process (a fixed handful of
reads; nothing at all without ``[alerts]``). What holds and was not told
in the last :data:`~.settings.REPEAT_HOURS` is *claimed* in
``mailsync_meta`` — one row per (condition, subject), its value the time
it was told, set by compare-and-set in one transaction — so two processes
on one database (a serve and a hand-run sync, two workers) or a restart
never tell it twice: the one whose claim lands sends. Then one short
plain-text mail goes to every ``to`` address through the node's own send
account (``[mailbox] send``). A mail that goes to nobody gives the claims
back, so the next check tries again; any failure — the database, the mail
server, a refused address — is logged (event ``alert-failed``) and never
fails the cycle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mailsync.alerts.conditions import Alert, evaluate
from mailsync.alerts.settings import REPEAT_HOURS
from mailsync.config import NodeConfig
from mailsync.errors import ConfigError, MailsyncError, TransportError, first_line
from mailsync.journal import Journal
from mailsync.store.tables import meta_table, now
from mailsync.transport import TransportContext, open_sender

logger = logging.getLogger("mailsync")

#: mailsync_meta keys of the once-a-day rule start with this
PREFIX = "alert:"
#: a claim older than this is forgotten (the condition is long told)
FORGET_AFTER = dt.timedelta(days=7)
_KEY_MAX = 64  # mailsync_meta.key


def meta_key(condition: str, subject: str) -> str:
    """``alert:parked:koeln/customers``; a long subject by its digest (the
    key column holds 64 characters)."""
    key = f"{PREFIX}{condition}:{subject}"
    if len(key) <= _KEY_MAX:
        return key
    digest = hashlib.sha256(subject.encode()).hexdigest()[:24]
    return f"{PREFIX}{condition}:#{digest}"


def _stamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _parse(value: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None  # a value someone wrote by hand: as if never told
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def told(conn: Connection) -> dict[str, str]:
    """Every remembered claim: meta key → the stored time (as text)."""
    return dict(
        conn.execute(
            select(meta_table.c.key, meta_table.c.value).where(
                meta_table.c.key.startswith(PREFIX, autoescape=True)
            )
        ).all()
    )


@dataclass
class Claim:
    alert: Alert
    key: str
    #: the value before the claim (None: no row), to give it back
    before: str | None
    value: str


def claim(engine: Engine, alerts: Sequence[Alert], at: dt.datetime) -> list[Claim]:
    """Take the alerts due to be told now, by compare-and-set in one
    transaction: an alert someone else told within the day is not taken."""
    cutoff = at - dt.timedelta(hours=REPEAT_HOURS)
    stamp = _stamp(at)
    taken: list[Claim] = []
    with engine.begin() as conn:
        known = told(conn)
        for alert in alerts:
            key = meta_key(alert.condition, alert.subject)
            before = known.get(key)
            last = _parse(before) if before is not None else None
            if last is not None and last > cutoff:
                continue
            if before is None:
                try:
                    with conn.begin_nested():
                        conn.execute(meta_table.insert().values(key=key, value=stamp))
                except IntegrityError:
                    continue  # another process claimed it a moment ago
            else:
                done = conn.execute(
                    update(meta_table)
                    .where(meta_table.c.key == key, meta_table.c.value == before)
                    .values(value=stamp)
                )
                if done.rowcount != 1:
                    continue
            taken.append(Claim(alert, key, before, stamp))
        forget = _stamp(at - FORGET_AFTER)
        for key, value in known.items():
            if value < forget and all(c.key != key for c in taken):
                conn.execute(
                    delete(meta_table).where(meta_table.c.key == key, meta_table.c.value == value)
                )
    return taken


def give_back(engine: Engine, claims: Sequence[Claim]) -> None:
    """Undo claims whose mail went nowhere: the next check tries again."""
    with engine.begin() as conn:
        for c in claims:
            mine = (meta_table.c.key == c.key) & (meta_table.c.value == c.value)
            if c.before is None:
                conn.execute(delete(meta_table).where(mine))
            else:
                conn.execute(update(meta_table).where(mine).values(value=c.before))


def compose(config: NodeConfig, alerts: Sequence[Alert], at: dt.datetime, *, test: bool) -> bytes:
    """The mail: short, plain text, a subject that says which node and how
    many things; marked auto-generated (RFC 3834) so no one auto-replies."""
    from email.message import EmailMessage  # the modern email API: only when mailing
    from email.utils import format_datetime, make_msgid

    me = config.node_id
    msg = EmailMessage()
    msg["From"] = config.mailbox.address
    msg["To"] = ", ".join(config.alerts.to)
    msg["Date"] = format_datetime(at.astimezone(dt.UTC))
    msg["Message-ID"] = make_msgid(domain=config.mailbox.address.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    if test:
        msg["Subject"] = f"[mailsync alert] {me}: test"
        body = [
            f"This is a test alert from mailsync node {me} ({config.role}) "
            f"<{config.mailbox.address}>, sent by `mailsync alerts test`.",
            "",
            "Alerts about this node come to this address the same way.",
        ]
    else:
        names = sorted({a.condition for a in alerts})
        msg["Subject"] = (
            f"[mailsync alert] {me}: {len(alerts)} thing(s) need a person ({', '.join(names)})"
        )
        body = [
            f"mailsync node {me} ({config.role}) <{config.mailbox.address}> "
            f"at {at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC:",
            "",
            *(f"- {a.text}" for a in alerts),
            "",
            "Each of these is told at most once a day while it lasts.",
            f"`mailsync status` on {me} shows the whole state.",
        ]
    msg.set_content("\n".join(body) + "\n")
    return msg.as_bytes()


Transport = Callable[[], TransportContext]


def deliver(config: NodeConfig, transport: Transport, raw: bytes) -> tuple[list[str], list[str]]:
    """Send ``raw`` to every ``to`` address through the node's own send
    account: (who got it, a line per failure)."""
    if not config.alerts.enabled:
        raise ConfigError(
            f"{config.path}: no [alerts] table with a 'to' address",
            hint='add [alerts] with to = "admin@firma.example"',
        )
    sent: list[str] = []
    failed: list[str] = []
    with open_sender(config.mailbox.send, transport()) as tx:
        for address in config.alerts.to:
            try:
                tx.send(config.mailbox.address, address, raw)
            except TransportError as exc:
                scope: str = exc.scope
                if scope != "peer":
                    raise  # the mail server itself: nobody will get it
                failed.append(f"{address}: {exc}")
            else:
                sent.append(address)
    return sent, failed


def send_test(config: NodeConfig, transport: Transport) -> list[str]:
    """``mailsync alerts test``: one test mail to every ``to`` address;
    TransportError (exit 4) when it reached none of them."""
    sent, failed = deliver(config, transport, compose(config, [], now(), test=True))
    if not sent:
        raise TransportError(
            f"the test alert reached nobody: {'; '.join(failed)}",
            hint="check [alerts] to and the [mailbox] send account (`mailsync mailbox test`)",
        )
    for line in failed:
        logger.warning("%s: test alert not sent to %s", config.node_id, line)
    return sent


class Watcher:
    """The alert check after each cycle of one node (one per process)."""

    def __init__(
        self, config: NodeConfig, engine: Engine, journal: Journal, transport: Transport
    ) -> None:
        self.config = config
        self.engine = engine
        self.journal = journal
        self.transport = transport
        #: monotonic time of the last check in this process
        self.checked: float | None = None

    def due(self) -> bool:
        settings = self.config.alerts
        if not settings.enabled:
            return False
        return (
            self.checked is None or time.monotonic() - self.checked >= settings.every_minutes * 60
        )

    def after_cycle(self, at: dt.datetime | None = None) -> list[Alert]:
        """Check when due; mail what is due to be told. What was mailed;
        never raises (a failure is logged as ``alert-failed``)."""
        if not self.due():
            return []
        self.checked = time.monotonic()
        try:
            return self.check(at or now())
        except (MailsyncError, SQLAlchemyError, OSError) as exc:
            text = first_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
            self._failed(f"alerts could not be checked or sent: {text}")
        except Exception as exc:  # a bug must not cost the cycle: said, with its traceback
            logger.error("%s: alerts failed", self.config.node_id, exc_info=True)
            self._failed(f"alerts failed: unexpected {type(exc).__name__}: {exc}")
        return []

    def check(self, at: dt.datetime) -> list[Alert]:
        """Evaluate, claim, mail; give the claims back when nobody got it."""
        with self.engine.connect() as conn:
            known = told(conn)
            windows = {
                (cond, ""): last
                for cond in ("restore", "hostile")
                if (value := known.get(meta_key(cond, ""))) and (last := _parse(value))
            }
            alerts = evaluate(
                conn,
                self.config.alerts,
                is_host=self.config.role == "host",
                now=at,
                told=windows,
            )
        if not alerts:
            return []
        claims = claim(self.engine, alerts, at)
        if not claims:
            return []
        mine = [c.alert for c in claims]
        try:
            sent, failed = deliver(
                self.config, self.transport, compose(self.config, mine, at, test=False)
            )
        except BaseException:
            give_back(self.engine, claims)
            raise
        if not sent:
            give_back(self.engine, claims)
            self._failed(f"alert not sent: {'; '.join(failed)}")
            return []
        for line in failed:
            self._failed(f"alert not sent to {line}")
        self.journal.info(
            "alert",
            f"alert sent to {', '.join(sent)}: "
            + "; ".join(f"{a.condition} {a.subject}".strip() for a in mine),
        )
        return mine

    def _failed(self, text: str) -> None:
        # the database may be what failed: the logger has the line anyway
        with contextlib.suppress(SQLAlchemyError):
            self.journal.warning("alert-failed", text)
