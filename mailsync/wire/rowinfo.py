"""Per-row change information: which columns an update changed, and when.

A control record of kind ``rows`` goes right before the row batch it
describes, one entry per row, in the batch's order: the changed columns as
a bit mask over the batch's table declaration (bit i for column i; the
columns from 62 on share bit 62: "one of them changed") and the capture
time in ms since the epoch on the sender's clock. ``None`` in either list,
or no record at all, means "unknown": every column changed, no time. So a
changeset from a peer of an older version (no such record) still applies,
each of its updates a change of the whole row, and a peer of an older
version ignores the record (an unknown control kind).

The receiver's conflict test uses it (:mod:`mailsync.conflicts`): edits of
different columns of one row on the two sides are both kept; ``newest-wins``
without a time column compares the capture times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailsync.errors import MessageError

KIND = "rows"
#: Columns from this index on share one bit.
SHARED_BIT = 62
_MAX_MASK = (1 << (SHARED_BIT + 1)) - 1


@dataclass(frozen=True)
class RowInfo:
    """What the sender knows of each row of the batch that follows."""

    op: str
    cols: tuple[int | None, ...]
    at: tuple[int | None, ...]

    def payload(self) -> dict[str, Any]:
        return {"op": self.op, "cols": list(self.cols), "at": list(self.at)}

    def changed(self, index: int, names: Sequence[str]) -> frozenset[str] | None:
        """The columns row ``index`` changed (None: every column)."""
        mask = self.cols[index]
        if not mask:  # unknown, or a row touched without a change: all of it
            return None
        return frozenset(n for i, n in enumerate(names) if mask & (1 << min(i, SHARED_BIT)))


def row_info(op: str, rows: Sequence[tuple[int | None, int | None]]) -> dict[str, Any]:
    """The record's payload for a batch: per row (changed columns, time)."""
    return RowInfo(op, tuple(c for c, _ in rows), tuple(a for _, a in rows)).payload()


def parse(payload: Any) -> RowInfo:
    """The record, checked: an op, two lists of equal length holding
    integers in range or None."""
    if not isinstance(payload, dict):
        raise MessageError("row information: not a map")
    op, cols, at = payload.get("op"), payload.get("cols"), payload.get("at")
    if op not in ("I", "U", "D") or not isinstance(cols, list) or not isinstance(at, list):
        raise MessageError("row information: needs op, cols and at")
    if len(cols) != len(at):
        raise MessageError("row information: cols and at differ in length")
    for mask in cols:
        if mask is not None and (not _is_int(mask) or not 0 <= mask <= _MAX_MASK):
            raise MessageError(f"row information: bad column mask {mask!r}")
    for when in at:
        if when is not None and (not _is_int(when) or not 0 <= when < 1 << 62):
            raise MessageError(f"row information: bad capture time {when!r}")
    return RowInfo(str(op), tuple(cols), tuple(at))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
