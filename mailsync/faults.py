"""Crash points for tests: ``MAILSYNC_FAULT=NAME`` kills the process there.

The crash tests run ``mailsync sync`` as a subprocess with this variable set
to one of :data:`POINTS`; the process SIGKILLs itself at that instant, as a
laptop closed mid-sync would stop it, and the test checks that the next
cycle loses nothing and applies nothing twice. Unset, it costs one
dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

ENV = "MAILSYNC_FAULT"
POINTS = (
    "after-buffer",  # a message is buffered and committed, still in the mailbox
    "in-apply",  # inside the apply transaction, before its commit
    "after-apply",  # a changeset is applied and committed
    "after-build",  # an envelope is in the outbox, not yet sent
    "after-send",  # the mail system has the message, the outbox does not know
    "witness-ahead",  # the restore witness is written, the database not yet committed
    "witness-behind",  # the cycle committed its work, the witness is not renewed yet
    "start",  # the command is starting: nothing imported but this module
)


#: ``MAILSYNC_FAULT=NAME:int`` sends SIGINT instead, as a Ctrl-C at that
#: instant would
INTERRUPT = ":int"


def point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == name + INTERRUPT:
        os.kill(os.getpid(), signal.SIGINT)
