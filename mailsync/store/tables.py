"""mailsync's own tables, kept inside the application database.

Keeping the change log, outbox, inbox buffer, link sequence numbers,
stations and rules in the same database as the business tables is what makes
delivery exactly-once: applying a changeset and recording its sequence number
commit in one transaction (DESIGN §3).

All names start with ``mailsync_``. ``mailsync_meta`` records the schema
version; :func:`ensure_schema` creates what is missing and migrates older
versions step by step.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.exc import IntegrityError

SCHEMA_VERSION = 12
PREFIX = "mailsync_"
ALL_STATIONS = "*"

#: A 64-bit integer key that SQLite still treats as its rowid alias.
_Id = BigInteger().with_variant(Integer, "sqlite")
_Time = DateTime(timezone=True)

metadata = MetaData()

meta_table = Table(
    "mailsync_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

changes = Table(
    "mailsync_changes",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("tbl", String(128), nullable=False),
    Column("pk", Text, nullable=False),
    Column("op", String(1), nullable=False),
    Column("origin", String(64)),
    # an update's changed columns: bit i for column i (62 and on share bit
    # 62); NULL or 0: every column (an insert, a delete, a row touched)
    Column("cols", BigInteger),
    Column("at", BigInteger),  # capture time, ms since the epoch (updates, deletes)
    sqlite_autoincrement=True,  # never reuse an id after a purge
)

applying = Table(
    "mailsync_applying",
    metadata,
    Column("origin", String(64), primary_key=True),
)

links = Table(
    "mailsync_links",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("address", String(320), nullable=False),
    Column("out_seq", BigInteger, nullable=False, default=0),
    Column("in_seq", BigInteger, nullable=False, default=0),
    Column("acked_seq", BigInteger, nullable=False, default=0),
    Column("change_cursor", BigInteger, nullable=False, default=0),
    Column("rules_hash", String(64)),
    # the key id of ours this peer was told about, and in which message
    Column("key_announced", String(16)),
    Column("key_announced_seq", BigInteger, nullable=False, default=0),
    # the highest inbound sequence our last message to the peer acknowledged
    Column("ack_sent", BigInteger, nullable=False, default=0),
    Column("gap_requested_at", _Time),
    # the changeset id of the last changeset applied from the peer (acks name
    # it, so a peer whose database went back to a backup notices)
    Column("in_cid", String(32), nullable=False, default=""),
    # remote: we lost changesets we had applied (a restored backup) and wait
    # for a reload, asked for at reload_asked_at; host: a reload is to be built
    Column("reload_wanted", Boolean, nullable=False, default=False),
    Column("reload_asked_at", _Time),
    Column("reload_seq", BigInteger, nullable=False, default=0),
    # remote: the id of the reload request in force; host: of the last one
    # served (a request delayed in the mail must not cause a second reload)
    Column("reload_request", String(32)),
    Column("last_contact", _Time),
    Column("last_sent", _Time),
    # the number of our last unsequenced (control) message to the peer, and
    # the highest the peer's carried: one not above it is a replay (v2)
    Column("ctl_sent", BigInteger, nullable=False, default=0),
    Column("ctl_seen", BigInteger, nullable=False, default=0),
    # why the peer's inbound changesets do not apply (a failure, a
    # quarantined changeset), since when; NULL while they flow (v3)
    Column("held", Text),
    Column("held_since", _Time),
    # a database went back to a backup (v5): our next changeset applies on
    # top of whatever the peer holds (it may miss ones we no longer have)
    Column("rebase", Boolean, nullable=False, default=False),
    # remote: the host went back; our next changeset carries every row we
    # send up, and the reload we then ask for waits for its ack (resent_seq)
    Column("resend_all", Boolean, nullable=False, default=False),
    Column("resent_seq", BigInteger, nullable=False, default=0),
    # host: we went back; the station is told (notice_sent_at) and sends
    # its leases and what we lost; no block is granted it until it reports
    Column("report_due", Boolean, nullable=False, default=False),
    Column("notice_sent_at", _Time),
    # host: the station is disabled (nothing goes to it, what it sends is
    # held) since when; the standing it is yet to be told by mail (v9)
    Column("paused_at", _Time),
    Column("standing_due", String(16)),
    # host: the id of the station's last own reload request acted on, and
    # whether a changeset told the station so (v9)
    Column("table_request", String(32)),
    Column("request_told", Boolean, nullable=False, default=True),
    # a verification has something for this peer: a request, an answer or
    # a keyed resend waits for the next build (v10, mailsync/verification.py)
    Column("verify_due", Boolean, nullable=False, default=False),
)

peer_keys = Table(
    "mailsync_peer_keys",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("key_id", String(16), primary_key=True),
    Column("public", String(100), nullable=False),
    Column("added_at", _Time, nullable=False),
    Column("replaced_at", _Time),
)

stations = Table(
    "mailsync_stations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("label", String(200), nullable=False, default=""),
    Column("email", String(320), nullable=False),
    Column("created_at", _Time, nullable=False),
)

rules_table = Table(
    "mailsync_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tbl", String(128), nullable=False),
    Column("station", String(64), nullable=False, default=ALL_STATIONS),
    Column("down_ops", String(3), nullable=False),
    Column("up_ops", String(3), nullable=False),
    Column("row_filter", Text),
    Column("conflict", String(16), nullable=False, default="host-wins"),
    Column("newest_by", String(128)),  # newest-wins: the time column compared
    Column("created_at", _Time, nullable=False),
    UniqueConstraint("tbl", "station", name="mailsync_rules_tbl_station"),
)

# A synced table's definition as it reached a station (host: one row per
# station and table loaded; a station: one per table whose definition the
# host sent, ``station`` the host's id). ``digest`` names the definition in
# ``mailsync_definitions`` (NULL: loaded before definitions were kept;
# ``definitions.RESYNC``: the admin asked for the table again); ``stopped``
# says why a breaking change on the host stops the table for this station.
loads = Table(
    "mailsync_loads",
    metadata,
    Column("station", String(64), primary_key=True),
    Column("tbl", String(128), primary_key=True),
    Column("loaded_at", _Time, nullable=False),
    # a resend of the rows changed since ``since`` (by the table's timestamp
    # column ``since_column``) is due to the station (v9)
    Column("since_column", String(128)),
    Column("since", _Time),
    # which definition of the table the station holds, and why a breaking
    # change stopped it (v11, mailsync/definitions.py)
    Column("digest", String(64)),
    Column("stopped", Text),
)

# A station removed on the host: the sealed message telling it so (sealed
# while its key was still known), when it went, and when its later mail was
# first set aside (said once, then quietly).
farewells = Table(
    "mailsync_farewells",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("address", String(320), nullable=False),
    Column("blob", LargeBinary),
    Column("removed_at", _Time, nullable=False),
    Column("sent_at", _Time),
    Column("heard_at", _Time),
)

# Every definition a station was sent (portable JSON, :mod:`mailsync.provision`),
# by its digest: what a station has is compared with what the host has now.
definitions = Table(
    "mailsync_definitions",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("tbl", String(128), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", _Time, nullable=False),
)

# One row per part of a sealed changeset, kept until the peer acknowledges
# the sequence number. ``cursor_from`` is the link's change-log cursor before
# the build: changes after it stay in the log until this entry is acked.
outbox = Table(
    "mailsync_outbox",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("parts", Integer, nullable=False),
    Column("cid", String(32), nullable=False, default=""),
    Column("blob", LargeBinary, nullable=False),
    Column("rows", BigInteger, nullable=False, default=0),
    Column("raw_size", BigInteger, nullable=False, default=0),
    Column("cursor_from", BigInteger, nullable=False, default=0),
    Column("ack", BigInteger, nullable=False, default=0),  # as sealed in its header
    Column("created_at", _Time, nullable=False),
    Column("sent_at", _Time),
    Column("send_count", Integer, nullable=False, default=0),
)

# Received parts, still sealed, until their changeset is applied. All parts
# of one sequence number share a changeset id (``cid``).
inbox = Table(
    "mailsync_inbox",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("parts", Integer, nullable=False),
    Column("cid", String(32), nullable=False),
    Column("base", BigInteger, nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("received_at", _Time, nullable=False),
    # v3: the blob's length (the per-peer cap sums it), and per changeset
    # (the same on each of its parts): failed attempts to apply it, the
    # last failure, and when it was quarantined (no longer tried by itself)
    Column("size", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("quarantined_at", _Time),
)

parked = Table(
    "mailsync_parked",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("peer", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("tbl", String(128), nullable=False),
    Column("op", String(8), nullable=False),  # I, U (update only) or D
    Column("columns", Text, nullable=False),  # JSON: [names], [key names]
    Column("row", LargeBinary, nullable=False),  # the values, packed
    Column("error", Text, nullable=False),
    Column("parked_at", _Time, nullable=False),
)

# A row changed here and at a peer before either had the other's change: the
# version that lost is kept here with the one that won (DESIGN §9).
conflicts_table = Table(
    "mailsync_conflicts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", _Time, nullable=False),
    Column("peer", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),  # the peer's changeset
    Column("tbl", String(128), nullable=False),
    Column("pk", Text, nullable=False),  # JSON
    Column("op", String(1), nullable=False),  # the peer's operation: I, U or D
    Column("policy", String(16), nullable=False),
    Column("kept", String(8), nullable=False),  # "ours" or "theirs"
    Column("columns", Text, nullable=False),  # JSON: the names of both versions' values
    Column("ours", LargeBinary),  # packed values; NULL: no such row here
    Column("theirs", LargeBinary),  # packed values; NULL: the peer deleted it
    # settled by policy, waiting for an admin (manual), or resolved by one
    Column("state", String(8), nullable=False, default="settled"),
    Column("source", String(8), nullable=False, default="here"),  # here, or the peer's note
    Column("differing", Text),  # JSON: the columns both sides changed to different values
    # detected here: our changesets that may have carried our version
    # (after ``mine_from``, up to ``mine_to``), to know the peer's note of it
    Column("mine_from", BigInteger),
    Column("mine_to", BigInteger),
    # a peer's note is matched with our record of the same row
    Index("mailsync_conflicts_row", "peer", "tbl", "pk"),
)

# What the other side of a conflict must hear (mailsync/conflict_notes.py):
# a conflict found here, an admin's decision; carried by the next changeset
# to ``peer`` and forgotten in the transaction that built it.
conflict_notes = Table(
    "mailsync_conflict_notes",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("peer", String(64), nullable=False, index=True),
    Column("note", LargeBinary, nullable=False),  # packed
)

# The change-log position each outbound changeset was built up to: a peer's
# changeset says which of ours it had applied (its ack), so our changes past
# that changeset's horizon are the ones it had not seen — the test for a
# conflict. Rows older than the peer's latest ack are pruned.
horizons = Table(
    "mailsync_horizons",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("horizon", BigInteger, nullable=False),
)

# Per-link zstd dictionaries (mailsync/dictionaries.py): ours ("out": ``seq``
# the changeset that carried it, NULL until one did; ``first_seq`` the first
# compressed with it) and the peers' ("in": ``seq`` where it arrived).
dictionaries = Table(
    "mailsync_dictionaries",
    metadata,
    Column("peer", String(64), primary_key=True),
    Column("way", String(3), primary_key=True),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
    Column("seq", BigInteger),
    Column("first_seq", BigInteger),
    Column("created_at", _Time, nullable=False),
)

# Recent small changeset bodies of a link, until a dictionary is trained.
dictionary_samples = Table(
    "mailsync_dictionary_samples",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("peer", String(64), nullable=False, index=True),
    Column("body", LargeBinary, nullable=False),
)

mailbox_seen = Table(
    "mailsync_mailbox_seen",
    metadata,
    Column("mailbox", String(400), primary_key=True),
    Column("uid", String(200), primary_key=True),
)

log_table = Table(
    "mailsync_log",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", _Time, nullable=False),
    Column("level", String(8), nullable=False),
    Column("event", String(32), nullable=False),
    Column("peer", String(64)),
    Column("message", Text, nullable=False),
    # every cycle purges by age and `status` counts recent problems: without
    # it the purge alone took 171 ms at ten days of one-minute cycles (v4)
    Index("mailsync_log_at", "at"),
)

# Number ranges (DESIGN §8). The host defines them; a station learns a
# range's definition with its first lease. ``next_free`` (host) is the first
# number no lease has covered yet: blocks are carved upwards from ``first``.
ranges_table = Table(
    "mailsync_ranges",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("first", BigInteger, nullable=False),
    Column("last", BigInteger, nullable=False),
    Column("block", Integer, nullable=False),
    Column("threshold", Float, nullable=False),
    # a station may hold at most this many blocks it has not drawn from
    Column("max_blocks", Integer, nullable=False),
    Column("bind_table", String(128)),
    Column("bind_column", String(128)),
    Column("stations", Text),  # JSON list of station ids; NULL: every station
    Column("next_free", BigInteger, nullable=False),
    Column("created_at", _Time, nullable=False),
    Column("asked_at", _Time),  # station: when it last asked for a block
    Column("format", String(64)),  # e.g. 'R-{year}-{n:06}' (ranges/numformat.py); NULL: plain
)

# A station's own block size for a range, where it differs from the range's.
range_blocks = Table(
    "mailsync_range_blocks",
    metadata,
    Column("range_name", String(64), primary_key=True),
    Column("station", String(64), primary_key=True),
    Column("block", Integer, nullable=False),
)

# Numbers given back (a released lease's unused tail), free to lease again.
range_free = Table(
    "mailsync_range_free",
    metadata,
    Column("range_name", String(64), primary_key=True),
    Column("first", BigInteger, primary_key=True, autoincrement=False),
    Column("last", BigInteger, nullable=False),
)

# Blocks of a range leased to a node: the numbers first..last, of which
# first..next-1 are issued. The host holds every lease (its own and the
# stations'); a station holds its own, under the host's ids. ``state``:
# active, release (asked back, host), released (given back), retired (its
# holder went back to a backup: the unused rest is never issued again).
leases = Table(
    "mailsync_leases",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("range_name", String(64), nullable=False),
    Column("holder", String(64), nullable=False),
    Column("first", BigInteger, nullable=False),
    Column("last", BigInteger, nullable=False),
    Column("next", BigInteger, nullable=False),
    Column("state", String(10), nullable=False, default="active"),
    Column("granted_at", _Time, nullable=False),
    # host: the station confirmed it holds the lease (and its last state);
    # station: the host has heard our current ``next`` and state
    Column("confirmed", Boolean, nullable=False, default=False),
    Column("sent_at", _Time),  # host: grant or release last sent
    # numbers below this may have been issued: the restore witness holds it
    # (or more) before the database does, and nothing draws at or above (v5)
    Column("ceiling", BigInteger, nullable=False, default=0),
    Index("mailsync_leases_holder", "range_name", "holder", "first"),
    Index("mailsync_leases_of", "holder", "first"),  # a station's leases, every cycle
)

# ``mailsync verify`` (v8): on the host one row per verification of a table
# at a station (its rounds, what it found, the repair); on a station one
# row per verification the host asked for (the answer waiting to go).
verifications = Table(
    "mailsync_verifications",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("vid", String(32), nullable=False),  # the verification's name on the wire
    Column("side", String(8), nullable=False),  # "host" (asks) or "station" (answers)
    Column("peer", String(64), nullable=False),
    Column("tbl", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("repair", Boolean, nullable=False, default=False),
    Column("started_at", _Time, nullable=False),
    Column("updated_at", _Time, nullable=False),
    Column("finished_at", _Time),
    Column("rounds", Integer, nullable=False, default=0),
    Column("rows_compared", BigInteger, nullable=False, default=0),
    Column("differing", Integer, nullable=False, default=0),
    Column("outgoing", Text),  # JSON: what the next build carries for it
    Column("sent_seq", BigInteger),  # the changeset that carried it
    Column("expect", Text),  # JSON: the host's side of the round asked
    Column("todo", Text),  # JSON: spans still to look at
    Column("found", Text),  # JSON: the differing keys named so far
    Column("error", Text),
    Index("mailsync_verifications_of", "side", "peer", "tbl"),
)

# The one ``mailsync serve`` that runs this node: where, since when, and how
# its last cycle went. A row whose heartbeat is stale is a service that died.
service_table = Table(
    "mailsync_service",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _Time, nullable=False),
    Column("heartbeat_at", _Time, nullable=False),
    Column("next_run_at", _Time),
    Column("last_cycle_at", _Time),
    Column("last_outcome", Text),
    Column("last_peers", Text),  # JSON: peer -> the last cycle's outcome with it
    Column("stopped_at", _Time),
)

#: ``serve --workers``: one row per worker process that ever joined the node
#: (PostgreSQL). Alive is not a column: a live worker holds an advisory
#: lock on its row's id (:mod:`mailsync.dialects.pg_locks`), which the
#: database lets go the moment the process or its machine dies.
workers_table = Table(
    "mailsync_workers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _Time, nullable=False),
    Column("heartbeat_at", _Time, nullable=False),
    Column("stopped_at", _Time),
    Column("cycles", Integer, nullable=False, default=0),
    #: links it served in its last cycle, and whether it read the mailbox
    Column("links", Integer, nullable=False, default=0),
    Column("coordinated_at", _Time),
    Column("last_cycle_at", _Time),
    Column("last_outcome", Text),
)

#: Mail taken from the node's mailbox by the worker that read it, for the
#: worker that holds the sender's link (:mod:`mailsync.workers.mailbag`).
#: ``aside``: the owner set it aside (why); kept for an admin to look at.
mailbag = Table(
    "mailsync_mailbag",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("peer", String(64), nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("taken_at", _Time, nullable=False),
    Column("aside", Text),
    Index("mailsync_mailbag_peer", "peer", "id"),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def get_meta(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == key)).first()
    return None if row is None else str(row[0])


def set_meta(conn: Connection, key: str, value: str) -> None:
    """Write ``key`` (one statement where it exists: update first)."""
    update = meta_table.update().where(meta_table.c.key == key).values(value=value)
    if conn.execute(update).rowcount:
        return
    try:
        # a savepoint: another process (a second worker of the host) may
        # be writing the same new key at this moment; then it is an update
        with conn.begin_nested():
            conn.execute(meta_table.insert().values(key=key, value=value))
    except IntegrityError:
        conn.execute(update)
