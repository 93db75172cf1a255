"""What waits for a person, as library functions: parked rows, conflicts
and changesets buffered in the inbox (:mod:`mailsync.admin` has the rest of
the admin commands and the :class:`~mailsync.admin.Site` they take).

Each mutating function owns its transaction with its log line, as there;
an id that is not there is refused before anything changes (an operator who
mistyped one id must not have the others acted on).
"""

from __future__ import annotations

from collections.abc import Iterable

from mailsync import inbox
from mailsync import link as links_mod
from mailsync.admin import Site
from mailsync.apply import ParkedRow, list_parked, retry_parked_row
from mailsync.apply import drop_parked as drop_parked_rows
from mailsync.conflict_resolve import Keep, resolve
from mailsync.conflicts import Conflict
from mailsync.conflicts import drop_conflicts as drop_conflict_records
from mailsync.conflicts import list_conflicts as read_conflicts
from mailsync.errors import ConfigError
from mailsync.inbox import Buffered


def _all_known(wanted: set[int], found: Iterable[int], what: str, listed_by: str) -> None:
    """Refuse ids that are not there, before anything changes: an operator
    who mistyped one id must not have the others acted on."""
    missing = sorted(wanted - set(found))
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise ConfigError(
            f"no {what} {listed}: nothing was changed", hint=f"`mailsync {listed_by}`"
        )


def _ids(wanted: set[int] | None) -> str:
    return f" ({', '.join(map(str, sorted(wanted)))})" if wanted else ""


def parked_rows(site: Site) -> list[ParkedRow]:
    """The rows that could not be applied, oldest first."""
    with site.engine.connect() as conn:
        return list_parked(conn)


def retry_parked(site: Site, ids: Iterable[int] | None) -> tuple[int, int]:
    """Apply parked rows (these ids, or None: all) again after their cause
    was fixed; returns (applied, still parked). Each row is tried in its own
    transaction with its log line, so one that still fails keeps none of
    the others parked."""
    wanted = None if ids is None else set(ids)
    with site.engine.connect() as conn:
        rows = list_parked(conn, wanted)
        if wanted is not None:
            _all_known(wanted, (r.id for r in rows), "parked row", "errors list")
    done = failed = 0
    for row in rows:
        what = f"parked row {row.id} ({row.table}, from {row.peer} #{row.seq})"
        with site.engine.begin() as conn:
            found, error = retry_parked_row(conn, row.id)
            if not found:  # another admin dropped or applied it meanwhile
                continue
            if error is None:
                done += 1
                site.journal.info("parked", f"{what} applied on retry", conn=conn, peer=row.peer)
            else:
                failed += 1
                site.journal.warning(
                    "parked", f"{what} still fails: {error}", conn=conn, peer=row.peer
                )
    return done, failed


def drop_parked(site: Site, ids: Iterable[int] | None) -> int:
    """Forget parked rows (these ids, or None: all); their change is given up here."""
    wanted = None if ids is None else set(ids)
    with site.engine.begin() as conn:
        if wanted is not None:
            found = [r.id for r in list_parked(conn, wanted)]
            _all_known(wanted, found, "parked row", "errors list")
        dropped = drop_parked_rows(conn, wanted)
        site.journal.info("parked", f"{dropped} parked row(s) dropped{_ids(wanted)}", conn=conn)
    return dropped


# ----------------------------------------------------------------- conflicts


def list_conflicts(
    site: Site, *, table: str | None = None, limit: int | None = None, waiting: bool = False
) -> list[Conflict]:
    """Recorded conflicts, newest first (of one table, the newest ``limit``,
    only those waiting for an admin)."""
    with site.engine.connect() as conn:
        return read_conflicts(conn, table=table, limit=limit, waiting=waiting)


def resolve_conflict(site: Site, conflict_id: int, keep: Keep) -> Conflict:
    """Decide a ``manual`` conflict on the host: keep the host's or the
    station's version; the choice travels to the station with the next
    sync, so both converge (:mod:`mailsync.conflict_resolve`)."""
    if keep not in ("host", "station"):
        raise ConfigError(f"--keep {keep!r}: use host or station")
    if site.config.role != "host":
        raise ConfigError(
            f"conflicts are decided on the host; {site.config.node_id!r} is a remote: "
            "nothing was changed",
            hint="run `mailsync conflicts resolve` on the host; this station hears of it",
        )
    with site.engine.begin() as conn:
        record = resolve(conn, conflict_id, keep)
        site.journal.info(
            "conflict",
            f"conflict {conflict_id} (table {record.table} row {record.key}) resolved: "
            f"{'the host' if keep == 'host' else record.peer + chr(39) + 's'} version kept",
            conn=conn,
            peer=record.peer,
        )
    return record


def drop_conflicts(site: Site, ids: Iterable[int] | None) -> int:
    """Forget conflict records (these ids, or None: all) once dealt with;
    the rows stay as they are."""
    wanted = None if ids is None else set(ids)
    with site.engine.begin() as conn:
        if wanted is not None:
            found = [c.id for c in read_conflicts(conn, ids=wanted)]
            _all_known(wanted, found, "conflict record", "conflicts list")
        gone = drop_conflict_records(conn, None if wanted is None else sorted(wanted))
        site.journal.info("conflict", f"{gone} conflict record(s) dropped{_ids(wanted)}", conn=conn)
    return gone


# -------------------------------------------------------------------- inbox


def inbox_list(site: Site, peer: str | None = None) -> list[Buffered]:
    """The changesets waiting in the inbox (of one peer), in order."""
    with site.engine.connect() as conn:
        if peer is not None and links_mod.get(conn, peer) is None:
            raise ConfigError(f"unknown peer {peer!r}", hint="`mailsync status` lists the peers")
        return inbox.buffered(conn, peer)


def inbox_show(site: Site, peer: str, seq: int) -> Buffered:
    """One buffered changeset: its parts, its failures, why it waits."""
    with site.engine.connect() as conn:
        (found,) = inbox.named(conn, peer, seq)
        return found


def inbox_retry(site: Site, peer: str, seq: int | None = None) -> list[Buffered]:
    """Try the peer's buffered changesets (or one) again with the next sync:
    their failures forgotten, a quarantine lifted, missing parts asked for."""
    with site.engine.begin() as conn:
        chosen = inbox.retry(conn, peer, seq)
        what = f"changeset #{seq}" if seq is not None else f"{len(chosen)} changeset(s)"
        site.journal.info(
            "inbox", f"{what} from {peer} to be tried again by an admin", peer=peer, conn=conn
        )
    return chosen


def inbox_drop(site: Site, peer: str, seq: int, *, skip: bool = False) -> Buffered:
    """Drop a buffered changeset; ``skip``: the one next in line, never to be
    applied here (see :func:`mailsync.inbox.drop`)."""
    with site.engine.begin() as conn:
        dropped = inbox.drop(conn, peer, seq, skip=skip)
        if skip:
            site.journal.error(
                "inbox",
                f"changeset #{seq} from {peer} skipped by an admin: never applied here, its "
                f"rows are missing on this node ({dropped.state})",
                peer=peer,
                seq=seq,
                conn=conn,
            )
        else:
            site.journal.warning(
                "inbox",
                f"buffered changeset #{seq} from {peer} dropped by an admin; it is asked "
                "for again when its turn comes",
                peer=peer,
                seq=seq,
                conn=conn,
            )
    return dropped
