"""Which public keys a node trusts for each peer.

A peer's keys live in ``mailsync_peer_keys``: the current one (never
replaced) and, after the peer rotated its keys, the replaced ones until
their grace period ends, so that messages it signed or we encrypted before
the rotation still verify and open.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, and_, delete, or_, select, update

from mailsync.keys import DEFAULT_GRACE_DAYS, PublicKey
from mailsync.store.tables import now, peer_keys


def trust_key(conn: Connection, peer: str, key: PublicKey) -> bool:
    """Make ``key`` the peer's current key; returns False if it already was."""
    existing = conn.execute(
        select(peer_keys.c.replaced_at).where(
            peer_keys.c.peer == peer, peer_keys.c.key_id == key.key_id
        )
    ).first()
    if existing is not None and existing[0] is None:
        return False
    at = now()
    conn.execute(
        update(peer_keys)
        .where(peer_keys.c.peer == peer, peer_keys.c.replaced_at.is_(None))
        .values(replaced_at=at)
    )
    if existing is None:
        conn.execute(
            peer_keys.insert().values(peer=peer, key_id=key.key_id, public=key.token(), added_at=at)
        )
    else:
        conn.execute(
            update(peer_keys)
            .where(peer_keys.c.peer == peer, peer_keys.c.key_id == key.key_id)
            .values(replaced_at=None, added_at=at)
        )
    return True


def current_key(conn: Connection, peer: str) -> PublicKey | None:
    token = conn.execute(
        select(peer_keys.c.public).where(
            peer_keys.c.peer == peer, peer_keys.c.replaced_at.is_(None)
        )
    ).scalar()
    return None if token is None else PublicKey.parse(token)


def usable_keys(
    conn: Connection, peer: str, grace_days: int = DEFAULT_GRACE_DAYS
) -> list[PublicKey]:
    """The current key first, then replaced ones still within their grace."""
    limit = now() - dt.timedelta(days=grace_days)
    rows = conn.execute(
        select(peer_keys.c.public, peer_keys.c.replaced_at)
        .where(
            peer_keys.c.peer == peer,
            or_(peer_keys.c.replaced_at.is_(None), peer_keys.c.replaced_at > limit),
        )
        .order_by(peer_keys.c.replaced_at.is_not(None), peer_keys.c.added_at.desc())
    ).all()
    return [PublicKey.parse(r[0]) for r in rows]


def forget_peer(conn: Connection, peer: str) -> None:
    conn.execute(delete(peer_keys).where(and_(peer_keys.c.peer == peer)))
