"""Content checksums of tables: do two nodes hold the same rows?

Rows are read in primary-key order through the same type handling the sync
uses, each encoded with the changeset value codec, and hashed. Decimals are
normalised (``1.50`` and ``1.5`` are the same amount) so that databases that
keep a column's scale differently still agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from mailsync.store.reflection import reflect
from mailsync.wire.changeset import pack


@dataclass(frozen=True)
class TableChecksum:
    table: str
    rows: int
    digest: str


def _normal(value: Any) -> Any:
    if isinstance(value, Decimal) and value.is_finite():
        return value.normalize()
    return value


def table_checksum(conn: Connection, name: str, batch: int = 5000) -> TableChecksum:
    table = reflect(conn, name)
    query = select(*table.columns).order_by(*table.primary_key.columns)
    digest = hashlib.sha256()
    count = 0
    result = conn.execute(query, execution_options={"yield_per": batch})
    for row in result:
        digest.update(pack([_normal(v) for v in row]))
        count += 1
    return TableChecksum(name, count, digest.hexdigest()[:16])
