"""``mailsync inspect``: what a message carries, opened with this node's key.

Only the recipient can open a message (it is encrypted for the recipient's
key); anyone can read the clear header. The report says whether the
signature checks out against the sender's known key, and — when this node
is the recipient — the tables, row counts per operation and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailsync import dictionaries, trust
from mailsync.errors import MessageError
from mailsync.node import Node
from mailsync.wire.changeset import Control, RowBatch, Summary, read_changeset
from mailsync.wire.envelope import Header, read_header
from mailsync.wire.message import extract_envelope


@dataclass
class Inspection:
    header: Header
    message_size: int
    envelope_size: int
    verified: str  # "yes", or why not
    opened: str  # "yes", or why not
    raw_size: int = 0
    summary: Summary = field(default_factory=Summary)
    controls: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.raw_size / self.envelope_size if self.envelope_size else 0.0


class _Counting:
    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data: bytes = self.inner.read(size)  # type: ignore[attr-defined]
        self.count += len(data)
        return data


def inspect_message(node: Node, raw: bytes, origin: str = "message") -> Inspection:
    """Read a message as far as this node can; MessageError if it is not one."""
    blob = extract_envelope(raw, origin)
    header = read_header(blob, origin)
    report = Inspection(header, len(raw), len(blob), verified="no", opened="no")
    if header.sender == node.config.node_id:  # one of our own, e.g. from the outbox
        ring = node.ring
        keys = [p.public for p in [ring.current, *ring.usable_previous(node.config.key_grace_days)]]
    else:
        with node.engine.connect() as conn:
            keys = trust.usable_keys(conn, header.sender, node.config.key_grace_days)
    try:
        node.codec.verify(blob, origin, keys)
        report.verified = "yes"
    except MessageError as exc:
        report.verified = str(exc).removeprefix(f"{origin}: ")
        return report
    if header.recipient != node.config.node_id:
        report.opened = f"sealed for {header.recipient}, not for this node"
        return report
    if header.parts > 1:
        try:
            _, body = node.codec.decrypt(blob, origin, node.ring, keys)
        except MessageError as exc:
            report.opened = str(exc).removeprefix(f"{origin}: ")
            return report
        report.opened = (
            f"yes: part {header.part} of {header.parts} ({len(body):,} bytes compressed); "
            "the changeset reads only with all its parts"
        )
        return report
    try:
        if header.dictionary:  # the sender's dictionary, as this node holds it
            with node.engine.connect() as conn:
                dictionaries.ready(conn, node.codec, header.sender, header.dictionary, origin)
        _, stream = node.codec.open(blob, origin, node.ring, keys)
        counting = _Counting(stream)
        for record in read_changeset(counting, origin=origin):
            if isinstance(record, RowBatch):
                report.summary.count(record.table.name, record.op, len(record.rows))
            elif isinstance(record, Control):
                report.controls.append(record.kind)
        report.raw_size = counting.count
        report.opened = "yes"
    except MessageError as exc:
        report.opened = str(exc).removeprefix(f"{origin}: ")
    return report
