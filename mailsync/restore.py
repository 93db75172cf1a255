"""Noticing a database that went back to a backup before it issues a number.

Every mailsync action on a node — ``Node.open`` (so every command),
each sync cycle at its start and end, ``next_number`` — first calls
:func:`confirm`, which compares the database with its restore witness
(:mod:`mailsync.store.witness`) in one transaction and then renews the
witness:

- **in step** (same generation): nothing to heal;
- **the database is behind** (a lower generation): it was restored from a
  backup, or — one generation behind, nothing else gone back — the last
  write of the witness was interrupted before the database committed.
  Either way every lease moves past its witnessed ceiling (a number below
  it may have been issued in the lost future; skipping a few is cheap,
  issuing one twice is not) and a lease the witness saw end is ended.
  Where a link's sequence numbers went back, the link heals: a station
  asks the host for a reload and numbers its changesets past the lost ones
  (applied on top of whatever the host holds); the host, which has no
  one to reload it, tells the station, which sends again what the host
  lost, and learns the station's leases before it grants it a block;
- **the witness is behind** (an older copy put back): the database is the
  newer; the witness is written again;
- **no witness** where one was written (deleted, moved) or a **damaged**
  one (set aside as ``.damaged``): what was issued is unknown, so every
  lease of this node ends and new blocks are asked for.

A witness that another user owns, others can read, that names another node
or another database is refused (:class:`ConfigError`): nothing runs until
an admin puts the right one back or removes it.

The ceilings: nothing draws a number at or above a lease's ceiling in the
database (``draw`` and the bound column's trigger alike), and the witness
holds every ceiling before the database does, so a restored database
behind its witness can always be moved past everything issued. Renewing
reserves the whole of the lease in use and half of each spare: a trigger
can issue that many numbers between two mailsync actions, and a restore
costs at most that many.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import Connection, Engine, delete, func, select, update

from mailsync import faults
from mailsync import link as links_mod
from mailsync.dialects import dialect_for
from mailsync.errors import ConfigError
from mailsync.journal import Journal
from mailsync.ranges.model import Lease, as_lease, this_node
from mailsync.store.tables import (
    get_meta,
    leases,
    meta_table,
    now,
    range_free,
    ranges_table,
    set_meta,
)
from mailsync.store.witness import (
    DamagedWitness,
    Witness,
    read_witness,
    set_damaged_aside,
    write_witness,
)
from mailsync.workers import registry

#: ``mailsync_meta`` keys: the database's id, its witness generation, where
#: its witness lives (for ``next_number`` given only an engine), and what
#: the last restore was found to be (for ``status``).
DB_ID, GENERATION, WITNESS_PATH, NOTE = "db_id", "witness_generation", "witness_path", "restore"


@dataclass
class Finding:
    """What :func:`confirm` found and did, for the log and ``status``."""

    kind: str  # "in step", "restored", "interrupted", "lost", "witness behind"
    steps: list[str] = field(default_factory=list)
    #: the check wrote to the database (healed, or renewed the witness)
    wrote: bool = False


def confirm(engine: Engine, path: Path, journal: Journal) -> Finding:
    """Compare this database with its witness at ``path``, heal what went
    back, and renew the witness; one transaction (see the module's docstring)."""
    with engine.begin() as conn:
        found = check(conn, path, journal)
    return found


def check(
    conn: Connection, path: Path, journal: Journal, *, every: list[links_mod.Link] | None = None
) -> Finding:
    """:func:`confirm` in the caller's transaction (``every``: the links,
    when the caller read them in it already)."""
    me, is_host = this_node(conn)
    generation, database, recorded = _locked_generation(conn)
    damaged = False
    try:
        witness = read_witness(path, me, database)
    except DamagedWitness:
        set_damaged_aside(path)
        witness, damaged = None, True
    found = Finding("in step")
    if (witness is None and generation > 0) or (
        witness is not None and generation > witness.generation
    ):
        _not_shared(conn, path)
    if witness is None and (generation > 0 or damaged):
        found = _lost(conn, path, journal, damaged)
    elif witness is not None and generation < witness.generation:
        found = _went_back(conn, witness, generation, is_host, journal)
    elif witness is not None and generation > witness.generation:
        found = Finding("witness behind")
        journal.warning(
            "witness",
            f"the restore witness {path} is older than this database (generation "
            f"{witness.generation} < {generation}): an old copy was put back; written anew",
            conn=conn,
        )
    if found.steps:
        note = {"at": now().isoformat(timespec="seconds"), "kind": found.kind}
        note["text"] = "; ".join(found.steps)
        set_meta(conn, NOTE, json.dumps(note))
    healed = found.kind not in ("in step", "witness behind")
    renewed = renew(
        conn,
        path,
        witness,
        generation,
        (me, is_host, database, recorded),
        None if healed else every,
    )
    found.wrote = renewed or found.kind != "in step"
    return found


def reserve(conn: Connection) -> bool:
    """:func:`check` where the database knows its witness (a node opened it
    once), in the caller's transaction; False where it does not."""
    path = witness_of(conn)
    if path is None:
        return False
    me, _ = this_node(conn)
    check(conn, path, Journal(conn.engine, me))
    return True


def _not_shared(conn: Connection, path: Path) -> None:
    """A witness missing or behind here while workers of this node run on
    another machine (``serve --workers``): that machine writes the witness
    this one does not see. Healing would end every lease (a lost witness)
    or hide a restore; refused instead, with what to do."""
    others = sorted(registry.live_hosts(conn) - {socket.gethostname()})
    if others:
        raise ConfigError(
            f"{path}: this node's restore witness is missing or older here, and workers of "
            f"the node run on {', '.join(others)}: every machine serving one node must "
            "share its directory (config, key file and witness)",
            hint="put the node's directory on storage every machine mounts at the same path",
        )


def _locked_generation(conn: Connection) -> tuple[int, str, str | None]:
    """This database's witness generation, its row locked until the commit
    (on PostgreSQL; SQLite's write transaction holds the whole database),
    so that two processes never write the witness at once; its id, and
    where its witness was last written. One statement."""
    rows = dict(
        conn.execute(
            select(meta_table.c.key, meta_table.c.value)
            .where(meta_table.c.key.in_([GENERATION, DB_ID, WITNESS_PATH]))
            .with_for_update()
        ).all()
    )
    value = rows.get(GENERATION)
    recorded = rows.get(WITNESS_PATH)
    return (
        (int(value) if value is not None else 0),
        str(rows.get(DB_ID) or ""),
        None if recorded is None else str(recorded),
    )


def _my_leases(conn: Connection) -> list[Lease]:
    me, _ = this_node(conn)
    rows = conn.execute(select(leases).where(leases.c.holder == me).order_by(leases.c.first))
    return [as_lease(r) for r in rows]


def _ceiling(conn: Connection, lease_id: int) -> int:
    return int(conn.execute(select(leases.c.ceiling).where(leases.c.id == lease_id)).scalar_one())


# -------------------------------------------------------------- the findings


def _lost(conn: Connection, path: Path, journal: Journal, damaged: bool) -> Finding:
    """No (readable) witness where one was written: what was issued is
    unknown, so every active lease of this node ends."""
    me, _ = this_node(conn)
    ended = conn.execute(
        update(leases)
        .where(leases.c.holder == me, leases.c.state == "active")
        .values(state="retired", confirmed=False)
    ).rowcount
    what = "is damaged (set aside as .damaged)" if damaged else "is missing"
    step = (
        f"the restore witness {path} {what}: whether this database was restored cannot be "
        f"told, so {ended} number lease(s) ended (new blocks are asked for)"
    )
    journal.error("went-back", step, conn=conn)
    return Finding("lost", [step])


def _went_back(
    conn: Connection, witness: Witness, generation: int, is_host: bool, journal: Journal
) -> Finding:
    """The database is behind its witness: move every lease past what may
    have been issued, and heal the links whose sequence numbers went back."""
    steps: list[str] = []
    links_back = any(
        witness.out_seq.get(x.peer, 0) > x.out_seq or witness.in_seq.get(x.peer, 0) > x.in_seq
        for x in links_mod.all_links(conn)
    )
    restored = links_back or generation < witness.generation - 1
    found = Finding("restored" if restored else "interrupted", steps)
    first = (
        f"this database is behind its restore witness (generation {generation} < "
        f"{witness.generation}): "
        + (
            "it was restored from a backup"
            if restored
            else "the last update of the witness was interrupted (or the database went back "
            "by one update)"
        )
    )
    (journal.error if restored else journal.warning)("went-back", first, conn=conn)
    _heal_links(conn, witness, is_host, journal, steps)
    moved, ended, past = 0, 0, 0
    _leases_back(conn, witness, journal, steps)
    for lease in _my_leases(conn):
        if lease.state != "active":
            continue
        if lease.id in witness.closed:
            conn.execute(update(leases).where(leases.c.id == lease.id).values(state="retired"))
            ended += 1
            continue
        ceiling = max(witness.ceilings.get(lease.id, 0), _ceiling(conn, lease.id))
        if ceiling > lease.next:
            target = min(ceiling, lease.last + 1)
            conn.execute(
                update(leases)
                .where(leases.c.id == lease.id)
                .values(next=target, ceiling=max(ceiling, target), confirmed=False)
            )
            moved += 1
            past = max(past, target - 1)
    if moved or ended:
        step = f"{moved} lease(s) moved past {past}" if moved else ""
        if ended:
            step += (", " if step else "") + f"{ended} lease(s) the witness saw end ended"
        journal.warning(
            "range",
            f"{step}: no number issued before the restore is issued again",
            conn=conn,
        )
        steps.insert(0, step)
    if is_host:
        _host_floors(conn, witness, journal, steps)
    steps.insert(0, "restored from a backup" if restored else "an interrupted witness update")
    return found


def _leases_back(conn: Connection, witness: Witness, journal: Journal, steps: list[str]) -> int:
    """Leases the witness saw that this database does not hold (granted
    after the backup) come back, from their ceiling on: a station restored
    while offline keeps drawing new numbers. Only for ranges it knows."""
    me, _ = this_node(conn)
    held = set(conn.execute(select(leases.c.id)).scalars())
    known = set(conn.execute(select(ranges_table.c.name)).scalars())
    back = []
    for lease_id, (name, first, last) in sorted(witness.spans.items()):
        if lease_id in held or lease_id in witness.closed or name not in known:
            continue
        ceiling = min(max(witness.ceilings.get(lease_id, last + 1), first), last + 1)
        conn.execute(
            leases.insert().values(
                id=lease_id,
                range_name=name,
                holder=me,
                first=first,
                last=last,
                next=ceiling,
                state="active",
                granted_at=now(),
                confirmed=False,
                ceiling=ceiling,
            )
        )
        back.append(f"{name} {first}-{last}")
    if back:
        step = f"{len(back)} lease(s) granted after the backup taken back: {', '.join(back)}"
        journal.warning("range", step, conn=conn)
        steps.append(step)
    return len(back)


def _heal_links(
    conn: Connection, witness: Witness, is_host: bool, journal: Journal, steps: list[str]
) -> bool:
    """Links whose sequence numbers went back: the station side asks for a
    reload and numbers past the lost changesets; the host side tells the
    station (and every station, to learn their leases). Returns whether any
    went back."""
    back = False
    for link in links_mod.all_links(conn):
        peer = link.peer
        out_seq, in_seq = witness.out_seq.get(peer, 0), witness.in_seq.get(peer, 0)
        if out_seq > link.out_seq:
            back = True
            links_mod.outbound_went_back(conn, link, out_seq)
            links_mod.rebased(conn, peer)
            line = (
                f"changesets to {peer} are numbered from #{out_seq + 1} on (up to #{out_seq} "
                "went out before the restore); what they carried is sent again"
            )
            journal.warning("went-back", line, peer=peer, conn=conn)
            steps.append(f"changesets to {peer} renumbered from #{out_seq + 1}")
        if in_seq > link.in_seq:
            back = True
        if is_host and (in_seq > link.in_seq or out_seq > link.out_seq):
            links_mod.peer_to_report(conn, peer)
            journal.error(
                "went-back",
                f"this database lost changesets from {peer} (it had applied up to #{in_seq}, "
                f"now #{link.in_seq}): {peer} is told to send again what it sent since, and "
                "its number leases, before it gets another block",
                peer=peer,
                conn=conn,
            )
            steps.append(f"{peer} asked to send again what it sent since #{link.in_seq}")
        elif not is_host and (in_seq > link.in_seq or out_seq > link.out_seq):
            if not links_mod.one(conn, peer).reload_wanted:
                links_mod.reload_wanted(conn, peer)
            journal.error(
                "went-back",
                f"this database lost what {peer} sent since #{link.in_seq} (it had applied "
                f"#{in_seq}) and its own rows sent since: a reload is asked of {peer}",
                peer=peer,
                conn=conn,
            )
            steps.append(f"reload requested of {peer}")
    if is_host and back:
        for link in links_mod.all_links(conn):
            if not link.report_due:
                links_mod.peer_to_report(conn, link.peer)
    return back


def _host_floors(conn: Connection, witness: Witness, journal: Journal, steps: list[str]) -> None:
    """A host behind its witness: blocks are carved past every one it
    leased before the restore, given-back numbers are not leased again
    (they may have been since), and lease ids are not used twice."""
    raised = []
    for name, free in witness.next_free.items():
        result = conn.execute(
            update(ranges_table)
            .where(ranges_table.c.name == name, ranges_table.c.next_free < free)
            .values(next_free=free)
        )
        if result.rowcount:
            raised.append(f"{name} from {free}")
    dropped = conn.execute(delete(range_free)).rowcount
    dialect_for(conn).lease_ids_above(conn, witness.lease_id)
    if raised or dropped:
        step = "new blocks " + (", ".join(raised) if raised else "as before")
        if dropped:
            step += f"; {dropped} given-back span(s) not leased again"
        journal.warning("range", step, conn=conn)
        steps.append(step)


# ------------------------------------------------------------------- renew


def _wanted_ceilings(mine: list[Lease], current: dict[int, int]) -> dict[int, int]:
    """Ceilings to reserve: the whole of the lease in use (the lowest with
    numbers left, per range) and half of every other, never lower than now."""
    wanted: dict[int, int] = {}
    in_use: set[str] = set()
    for lease in mine:  # ordered by first
        if lease.state != "active":
            continue
        have = current.get(lease.id, lease.first)
        if lease.next > lease.last or lease.range not in in_use:
            want = lease.last + 1
            if lease.next <= lease.last:
                in_use.add(lease.range)
        else:
            want = min(lease.last + 1, lease.next + (lease.size + 1) // 2)
        wanted[lease.id] = max(have, want)
    return wanted


def renew(
    conn: Connection,
    path: Path,
    witness: Witness | None,
    generation: int,
    node: tuple[str, bool, str, str | None],
    every: list[links_mod.Link] | None = None,
) -> bool:
    """Write the witness anew (first, fsynced) where the database holds
    more than it says or a lease needs more numbers reserved, then raise
    the database's ceilings and generation (committed by the caller).
    ``node``: this node's id, whether it is the host, the database's id,
    where the database says its witness was last written;
    ``every``: the links, read in this transaction already (or None).
    Whether it wrote."""
    me, is_host, database, recorded = node
    rows = conn.execute(select(leases).where(leases.c.holder == me).order_by(leases.c.first))
    mine, current = [], {}
    for row in rows:
        mine.append(as_lease(row))
        current[int(row.id)] = int(row.ceiling)
    wanted = _wanted_ceilings(mine, current)
    old = witness.ceilings if witness is not None else {}
    ceilings = {i: max(c, old.get(i, 0)) for i, c in wanted.items()}
    closed = frozenset(x.id for x in mine if x.state != "active")
    if witness is not None:
        closed |= witness.closed & {x.id for x in mine}
    out_seq: dict[str, int] = {}
    in_seq: dict[str, int] = {}
    for link in links_mod.all_links(conn) if every is None else every:
        out_seq[link.peer], in_seq[link.peer] = link.out_seq, link.in_seq
    next_free: dict[str, int] = {}
    lease_id = 0
    if is_host:
        query = select(ranges_table.c.name, ranges_table.c.next_free)
        next_free = {str(n): int(f) for n, f in conn.execute(query)}
        lease_id = int(conn.execute(select(func.max(leases.c.id))).scalar() or 0)
        if witness is not None:
            lease_id = max(lease_id, witness.lease_id)
            for name, free in witness.next_free.items():
                if name in next_free:
                    next_free[name] = max(next_free[name], free)
    spans = {x.id: (x.range, x.first, x.last) for x in mine if x.state == "active"}
    fresh = Witness(me, database, 0, ceilings, closed, spans, out_seq, in_seq, next_free, lease_id)
    if (
        witness is not None
        and generation == witness.generation
        and replace(witness, generation=0) == fresh
        and all(current.get(i) == c for i, c in ceilings.items())
    ):
        return False
    number = max(generation, witness.generation if witness is not None else 0) + 1
    write_witness(path, replace(fresh, generation=number))
    faults.point("witness-ahead")  # the witness holds more than the database yet
    for lease_id_, ceiling in ceilings.items():
        if current.get(lease_id_) != ceiling:
            conn.execute(update(leases).where(leases.c.id == lease_id_).values(ceiling=ceiling))
    set_meta(conn, GENERATION, str(number))
    where = str(path.resolve())
    if where != recorded:
        set_meta(conn, WITNESS_PATH, where)
    return True


def witness_of(conn: Connection) -> Path | None:
    """Where this database's witness lives, as the last write recorded it."""
    value = get_meta(conn, WITNESS_PATH)
    return Path(value) if value else None


def last_finding(conn: Connection) -> tuple[dt.datetime, str, str] | None:
    """When the last restore (or lost witness) was found, its kind and what was done."""
    value = get_meta(conn, NOTE)
    if not value:
        return None
    try:
        note = json.loads(value)
        return dt.datetime.fromisoformat(note["at"]), str(note["kind"]), str(note["text"])
    except (ValueError, KeyError, TypeError):
        return None
