"""An in-process post office, for fast tests and programs that embed mailsync.

``memory:`` URLs need a :class:`MemoryPostOffice` handed to the node
(``TransportContext.memory``); nothing is shared through module state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from mailsync.errors import ConfigError
from mailsync.transport.base import Incoming, Session, TransportContext


@dataclass
class MemoryPostOffice:
    """Mailboxes by address; each holds (id, raw) pairs in delivery order."""

    boxes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    processed: dict[str, list[bytes]] = field(default_factory=dict)
    aside: dict[str, list[tuple[bytes, str]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def deliver(self, recipient: str, raw: bytes) -> str:
        message_id = f"m{next(self._ids)}"
        self.boxes.setdefault(recipient, {})[message_id] = raw
        return message_id

    def pending(self, address: str) -> int:
        return len(self.boxes.get(address, {}))


def _office(ctx: TransportContext) -> MemoryPostOffice:
    if not isinstance(ctx.memory, MemoryPostOffice):
        raise ConfigError("a memory: mailbox needs a MemoryPostOffice passed to the node")
    return ctx.memory


class MemorySender(Session):
    def __init__(self, url: str, ctx: TransportContext) -> None:
        self._office = _office(ctx)

    def send(self, sender: str, recipient: str, raw: bytes) -> None:
        self._office.deliver(recipient, raw)


class MemoryReceiver(Session):
    def __init__(self, url: str, ctx: TransportContext) -> None:
        self._office = _office(ctx)
        self._address = ctx.address

    def fetch(self) -> Iterator[Incoming]:
        box = self._office.boxes.get(self._address, {})
        for message_id, raw in list(box.items()):
            yield Incoming(message_id, raw)

    def _take(self, message_id: str) -> bytes:
        return self._office.boxes[self._address].pop(message_id)

    def processed(self, message_id: str) -> None:
        self._office.processed.setdefault(self._address, []).append(self._take(message_id))

    def set_aside(self, message_id: str, reason: str) -> None:
        self._office.aside.setdefault(self._address, []).append((self._take(message_id), reason))
