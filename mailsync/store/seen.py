"""Mail a receiver left in its mailbox on purpose, remembered per mailbox.

A POP3 mailbox (or one kept with ``keep_processed``) still holds messages
the node has buffered; their ids are kept here so that the next cycle does
not take them again. Implements :class:`mailsync.transport.base.SeenStore`.
"""

from __future__ import annotations

from sqlalchemy import Engine, delete, select

from mailsync.store.tables import mailbox_seen


class SeenInDatabase:
    """The ids a receiver left in its mailbox on purpose, kept per mailbox URL."""

    def __init__(self, engine: Engine, mailbox: str) -> None:
        self._engine = engine
        self._mailbox = mailbox

    def seen(self, message_id: str) -> bool:
        with self._engine.connect() as conn:
            return (
                conn.execute(
                    select(mailbox_seen.c.uid).where(
                        mailbox_seen.c.mailbox == self._mailbox, mailbox_seen.c.uid == message_id
                    )
                ).first()
                is not None
            )

    def remember(self, message_id: str) -> None:
        if not self.seen(message_id):
            with self._engine.begin() as conn:
                conn.execute(mailbox_seen.insert().values(mailbox=self._mailbox, uid=message_id))

    def keep_only(self, present: set[str]) -> None:
        with self._engine.begin() as conn:
            held = conn.execute(
                select(mailbox_seen.c.uid).where(mailbox_seen.c.mailbox == self._mailbox)
            ).scalars()
            gone = [uid for uid in held if uid not in present]
            if gone:
                conn.execute(
                    delete(mailbox_seen).where(
                        mailbox_seen.c.mailbox == self._mailbox, mailbox_seen.c.uid.in_(gone)
                    )
                )
