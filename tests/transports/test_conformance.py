"""One body of tests that every mailbox transport must pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsync.transport import TransportContext, open_receiver, open_sender
from mailsync.transport.memory import MemoryPostOffice


@pytest.fixture(params=["memory", "maildir"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, MemoryPostOffice]]:
    office = MemoryPostOffice()
    yield ("memory:" if request.param == "memory" else "maildir:post"), office


def ctx(tmp_path: Path, office: MemoryPostOffice, address: str) -> TransportContext:
    return TransportContext(address=address, base_dir=tmp_path, memory=office)


def test_send_fetch_process_and_set_aside(
    tmp_path: Path, urls: tuple[str, MemoryPostOffice]
) -> None:
    url, office = urls
    with open_sender(url, ctx(tmp_path, office, "a@x.test")) as tx:
        for i in range(3):
            tx.send("a@x.test", "b@x.test", f"message {i}\r\n".encode())
        tx.send("a@x.test", "c@x.test", b"for c")
    with open_receiver(url, ctx(tmp_path, office, "b@x.test")) as rx:
        got = list(rx.fetch())
        assert [m.raw for m in got] == [f"message {i}\r\n".encode() for i in range(3)]
        rx.processed(got[0].id)
        rx.set_aside(got[1].id, "spam")
    # what was neither processed nor set aside is still there next cycle
    with open_receiver(url, ctx(tmp_path, office, "b@x.test")) as rx:
        assert [m.raw for m in rx.fetch()] == [b"message 2\r\n"]
    with open_receiver(url, ctx(tmp_path, office, "c@x.test")) as rx:
        assert [m.raw for m in rx.fetch()] == [b"for c"]


def test_empty_mailbox(tmp_path: Path, urls: tuple[str, MemoryPostOffice]) -> None:
    url, office = urls
    with open_receiver(url, ctx(tmp_path, office, "nobody@x.test")) as rx:
        assert list(rx.fetch()) == []
