"""Progress inside a long step: rows and bytes as a load or an apply goes.

The steps that stream a changeset (:mod:`mailsync.build` packing rows for a
peer, :mod:`mailsync.apply` writing a peer's rows) call :func:`tick` after
every batch. A tick is a DEBUG record on the ``mailsync.progress`` logger
with structured fields (``event="progress"``, ``stage``, ``peer``, ``seq``,
``rows``, ``bytes``), never a print: the library stays quiet, and whoever
wants a live line — the CLI on a terminal — listens there, enabling the
level only while it shows one. Disabled, a tick costs one level check.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("mailsync.progress")


def tick(stage: str, peer: str, seq: int | None, rows: int, nbytes: int) -> None:
    """``stage`` ("packing", "applying") for ``peer``'s changeset ``seq``
    has handled ``rows`` rows and ``nbytes`` bytes of the changeset body."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    logger.debug(
        "%s changeset%s %s %s: %d rows, %d bytes",
        stage,
        f" #{seq}" if seq is not None else "",
        "for" if stage == "packing" else "from",
        peer,
        rows,
        nbytes,
        extra={
            "event": "progress",
            "stage": stage,
            "peer": peer,
            "seq": seq,
            "rows": rows,
            "bytes": nbytes,
        },
    )
