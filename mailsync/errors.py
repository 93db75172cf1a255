"""The exceptions mailsync raises, and what each one asks of the operator.

Every error a user can cause or meet in normal operation is a
:class:`MailsyncError`. The CLI prints ``str(error)`` (one line that says what
failed and where) plus the ``hint`` (what to do), and exits with
``exit_code`` — never a traceback. Third-party errors are mapped at the
boundary with ``raise ... from exc`` so the cause stays inspectable.

::

    MailsyncError
    ├── ConfigError          bad or missing config file, bad CLI argument
    ├── DatabaseError        application database cannot be opened / used
    │   └── SchemaError      table missing, no primary key, column mismatch
    ├── RuleError            a station or table rule cannot be defined
    ├── TransportError       a mailbox cannot be reached or written
    ├── MessageError         a message/changeset cannot be read (set aside)
    ├── ApplyError           a changeset cannot be applied (link waits)
    └── RangeError           a number range cannot give a number

``scope`` says how much work an error abandons, from least to most:

- ``"message"``: set this one message aside and go on;
- ``"peer"``: stop work on this link for the rest of the stage (its
  other messages wait for the next cycle); every other link goes on;
- ``"mailbox"``: this node's own mailbox cannot be used (server down, wrong
  password): the stage that needs it stops, the rest of the cycle goes on;
- ``"cycle"``: stop the whole cycle (the database is gone, a bug).

A raiser that knows better than its class passes ``scope=`` (an SMTP server
refusing one recipient is a ``"peer"`` matter, not the mailbox's). The
cycle confines each error with :func:`mailsync.cycle.contain.contained`.

The command line's exit codes are :data:`EXIT_CODES`, one table for every
command (the README prints it; ``tests/test_exit_codes.py`` runs each
command into each code it can give).
"""

from __future__ import annotations

from typing import Literal

Scope = Literal["message", "peer", "mailbox", "cycle"]

#: Scopes from the narrowest to the widest.
SCOPES: tuple[Scope, ...] = ("message", "peer", "mailbox", "cycle")


def first_line(exc: BaseException) -> str:
    """The first line of what a driver or library said, for one-line messages.

    SQLAlchemy wraps the driver's error in ``orig`` and appends the statement
    and a link on later lines; a bare exception with no text is named by its
    type."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return detail[0] if detail else type(exc).__name__


#: The command line's exit codes: one table, true for every command. An
#: error's class gives its code (``exit_code`` below); typer's own usage
#: errors (an unknown option, a missing argument) are 2 like a bad config.
EXIT_CODES: dict[int, str] = {
    0: "done",
    1: "a message that is not a mailsync message (`inspect`), or a bug: report it",
    2: "bad config file or command-line argument, or a rule that cannot be defined",
    3: "the database: cannot be opened, is not a mailsync node, lacks a table or a key",
    4: "a mailbox: server down, login refused, a message it would not take",
    5: "a changeset failed to apply (the link waits; `mailsync inbox`)",
    6: "a number range has no number left here",
    130: "interrupted (Ctrl-C): nothing lost, run the command again",
}

#: what a Ctrl-C says (the command line): every step commits before the
#: next relies on it, so an interrupted command is simply run again
INTERRUPTED = "interrupted; nothing lost — run the command again"


class MailsyncError(Exception):
    """Base of every error mailsync reports to a user."""

    exit_code: int = 1
    scope: Scope = "cycle"

    def __init__(
        self, message: str, *, hint: str | None = None, scope: Scope | None = None
    ) -> None:
        super().__init__(message)
        self.hint = hint
        if scope is not None:
            self.scope = scope


class ConfigError(MailsyncError):
    """The node configuration or a command-line argument is unusable."""

    exit_code = 2


class DatabaseError(MailsyncError):
    """The application database cannot be opened or used."""

    exit_code = 3


class SchemaError(DatabaseError):
    """A table is missing, lacks a primary key, or its columns do not match.

    It spoils the links that carry the table, not the database: a cycle
    holds those links and serves the others."""

    scope = "peer"


class RuleError(MailsyncError):
    """A station or table rule cannot be defined as asked."""

    exit_code = 2


class TransportError(MailsyncError):
    """A mailbox cannot be reached, read or written."""

    exit_code = 4
    scope = "mailbox"


class MessageError(MailsyncError):
    """A message or changeset cannot be read; it is set aside, never applied."""

    scope = "message"


class ApplyError(MailsyncError):
    """A changeset could not be applied; it stays buffered and the link waits."""

    exit_code = 5
    scope = "peer"


class RangeError(MailsyncError):
    """A number range cannot give a number (none left here, unknown range)."""

    exit_code = 6
