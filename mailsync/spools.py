"""The temporary files one build writes through: the compressed changeset cut
into parts (:class:`PartSpool`), and the keys of rows gone (:class:`KeySpool`),
so that neither a large load nor a mass delete sits in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

from mailsync.wire.changeset import pack, unpack_stream


class PartSpool:
    """The compressed changeset, cut into parts as it is written.

    It is spooled to a temporary file (in memory up to one part), because a
    part's header names the number of parts, known only at the end.
    """

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.size = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=part_size)  # noqa: SIM115

    def write(self, data: bytes, /) -> int:
        self.size += len(data)
        return self._file.write(data)

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def chunks(self) -> Iterator[bytes]:
        self._file.seek(0)
        for _ in range(self.parts):
            yield self._file.read(self.part_size)

    def close(self) -> None:
        self._file.close()


class KeySpool:
    """Tombstone keys of one build, kept on disk until the upserts are written
    (deletes go last, children first): a mass delete never sits in memory."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def add(self, table: str, keys: list[tuple[Any, ...]], ats: list[Any]) -> None:
        """Keys of rows gone, with their capture times."""
        if keys:
            if table not in self._files:
                self._files[table] = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115
            self._files[table].write(pack([keys, ats]))

    def read(self, table: str) -> Iterator[tuple[list[tuple[Any, ...]], list[Any]]]:
        spool = self._files.get(table)
        if spool is None:
            return
        spool.seek(0)
        for keys, ats in unpack_stream(spool):
            yield [tuple(k) for k in keys], ats

    def close(self) -> None:
        for spool in self._files.values():
            spool.close()
