"""The live line ``mailsync sync`` shows on a terminal (never into a pipe).

It listens to the library's logging, never to its prose: the journal's
records (``event`` received / applied / sent) count messages and
changesets, and :mod:`mailsync.progress`'s ticks (rows and bytes, after
every batch of a load or an apply) move while one big changeset is packed
or applied — the counters do not sit at 0 until the end. The progress
logger is enabled only while the line is shown; the line is redrawn at
every record (no timer thread), and goes away when the cycle ends, leaving
the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mailsync.cli.common import console

if TYPE_CHECKING:
    from mailsync.node import CycleReport, Node


def size(n: int) -> str:
    """Bytes for a person: 950 B, 12.3 kB, 4.5 MB, 1.2 GB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def with_progress(
    node: Node, stations: Iterable[str] = (), tables: Iterable[str] = ()
) -> CycleReport:
    """One cycle with a live line: messages received, changesets applied,
    parts sent, and the rows and bytes of the changeset in hand."""
    from rich.live import Live
    from rich.text import Text

    done = {"received": 0, "applied": 0, "sent": 0}

    class Show(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            event = str(getattr(record, "event", ""))
            if event == "progress":
                stage = getattr(record, "stage", "")
                seq = getattr(record, "seq", None)
                doing = (
                    f"{stage} changeset{f' #{seq}' if seq is not None else ''} "
                    f"{'for' if stage == 'packing' else 'from'} {getattr(record, 'peer', '')}: "
                    f"{int(getattr(record, 'rows', 0)):,} rows, "
                    f"{size(int(getattr(record, 'bytes', 0)))}"
                )
            else:
                if event in done:
                    done[event] += 1
                doing = record.getMessage().split(": ", 1)[-1][:90]
            line = (
                f"syncing: received {done['received']}, applied {done['applied']}, "
                f"sent {done['sent']} — {doing}"
            )
            live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)

    handler = Show(logging.DEBUG)
    logger = logging.getLogger("mailsync")
    ticks = logging.getLogger("mailsync.progress")
    levels = logger.level, ticks.level
    logger.addHandler(handler)
    logger.setLevel(min(levels[0] or logging.INFO, logging.INFO))
    ticks.setLevel(logging.DEBUG)
    try:
        with Live(
            Text("syncing…"), console=console.rich, auto_refresh=False, transient=True
        ) as live:
            return node.sync(stations, tables)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(levels[0])
        ticks.setLevel(levels[1])
