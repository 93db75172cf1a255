"""PostgreSQL advisory locks: how several host workers share one node.

Session-level locks, held on one connection per worker (``AUTOCOMMIT``: a
session lock outlives transactions, and the connection must not sit idle
in one). The database lets go of them the moment that connection ends —
a worker killed, its machine gone — so a dead worker's links and its
registration free themselves, with no timeout to wait out.

Three kinds (the worker and the intake on two 32-bit keys, told apart by
the first; a link on one 64-bit key, which PostgreSQL keeps apart from
both):

- :data:`WORKER`, the worker's row id in ``mailsync_workers``: held for the
  worker's life; whether it is held is whether the worker lives;
- a link: held by the worker serving it in its cycle, on one 64-bit key,
  ``hashtextextended(peer, LINK)`` (the one-key form of the lock: a 32-bit
  hash would give two of 10,000 stations one lock about once in a hundred
  hosts, and the second would wait for a worker that does not serve it);
- :data:`INTAKE`, 0: held by the worker reading the node's mailbox in its
  cycle (the coordinator's duties: the mailbox, the purge, farewells).

Advisory locks belong to one database, so two nodes in one PostgreSQL
cluster never see each other's.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text

#: First keys (a signed 32-bit integer each): "ms" and a kind.
WORKER = 0x6D730001
LINK = 0x6D730002
INTAKE = 0x6D730003


def try_lock(conn: Connection, kind: int, key: int) -> bool:
    """Take one lock unless another session holds it."""
    return bool(
        conn.execute(text("SELECT pg_try_advisory_lock(:k, :o)"), {"k": kind, "o": key}).scalar()
    )


def unlock(conn: Connection, kind: int, key: int) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(:k, :o)"), {"k": kind, "o": key})


def unlock_all(conn: Connection) -> None:
    """Every session lock of ``conn``'s session (before it goes back to a pool)."""
    conn.execute(text("SELECT pg_advisory_unlock_all()"))


def claim_links(conn: Connection, peers: Sequence[str], limit: int) -> list[str]:
    """Up to ``limit`` of ``peers``, tried in the order given, that no other
    session holds: one statement. The fence (``OFFSET 0`` below the filter)
    keeps PostgreSQL from trying a lock on a row it will not return: rows
    come in order, are tried one by one, and the scan stops at the limit."""
    if not peers or limit <= 0:
        return []
    rows = conn.execute(
        text(
            "SELECT p FROM (SELECT p, i FROM unnest(CAST(:peers AS text[])) "
            "WITH ORDINALITY AS t(p, i) ORDER BY i OFFSET 0) AS s "
            "WHERE pg_try_advisory_lock(hashtextextended(p, :k)) LIMIT :n"
        ),
        {"peers": list(peers), "k": LINK, "n": limit},
    )
    return [r[0] for r in rows]


def release_links(conn: Connection, peers: Sequence[str]) -> None:
    """Let go of the links :func:`claim_links` took (one statement)."""
    if peers:
        conn.execute(
            text(
                "SELECT pg_advisory_unlock(hashtextextended(p, :k)) "
                "FROM unnest(CAST(:peers AS text[])) p"
            ),
            {"peers": list(peers), "k": LINK},
        )


def held(conn: Connection, kind: int) -> set[int]:
    """The second keys of the ``kind`` locks some session holds in this
    database now (for :data:`WORKER`: the live workers' ids)."""
    rows = conn.execute(
        text(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = CAST(:k AS oid) AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"k": kind},
    )
    return {int(r[0]) for r in rows}
