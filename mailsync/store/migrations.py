"""The mailsync tables' versions: creating them, and the steps that bring
an older database up to this mailsync's :data:`~mailsync.store.tables.
SCHEMA_VERSION`, run by :func:`ensure_schema` when a node opens its
database (one transaction: a step that fails leaves the old version whole).

A step adds what its version added (columns by ``ALTER TABLE``; new tables
``create_all`` has made already, kept explicit here); ``tests/cluster.py``'s
``SCHEMA_ADDED`` lists the columns, and a test upgrades a database of every
older version.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from sqlalchemy import Connection, Engine, select

from mailsync.errors import DatabaseError
from mailsync.store.engine import describe_db_error
from mailsync.store.tables import (
    SCHEMA_VERSION,
    _Time,
    conflict_notes,
    definitions,
    dictionaries,
    dictionary_samples,
    farewells,
    get_meta,
    mailbag,
    meta_table,
    metadata,
    verifications,
    workers_table,
)


def _v1_to_v2(conn: Connection) -> None:
    """Control messages are numbered (replay protection): two counters per link."""
    for name in ("ctl_sent", "ctl_seen"):
        conn.exec_driver_sql(
            f"ALTER TABLE mailsync_links ADD COLUMN {name} BIGINT NOT NULL DEFAULT 0"
        )


def _v2_to_v3(conn: Connection) -> None:
    """Held links and a bounded inbox: a link's hold, each buffered part's
    size, each buffered changeset's failures and quarantine."""
    time = _Time.compile(dialect=conn.dialect)
    for table, column, kind in (
        ("mailsync_links", "held", "TEXT"),
        ("mailsync_links", "held_since", time),
        ("mailsync_inbox", "size", "INTEGER NOT NULL DEFAULT 0"),
        ("mailsync_inbox", "attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("mailsync_inbox", "last_error", "TEXT"),
        ("mailsync_inbox", "quarantined_at", time),
    ):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    conn.exec_driver_sql("UPDATE mailsync_inbox SET size = length(blob)")


def _v3_to_v4(conn: Connection) -> None:
    """The log is indexed by time (the purge and `status` read it so)."""
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS mailsync_log_at ON mailsync_log (at)")


def _v4_to_v5(conn: Connection) -> None:
    """The restore witness: a lease's ceiling (what may have been issued;
    every lease of an older version may have been drawn to its end), and a
    link's restore bookkeeping."""
    time = _Time.compile(dialect=conn.dialect)
    false = "false" if conn.dialect.name == "postgresql" else "0"
    for table, column, kind in (
        ("mailsync_leases", "ceiling", "BIGINT NOT NULL DEFAULT 0"),
        ("mailsync_links", "rebase", f"BOOLEAN NOT NULL DEFAULT {false}"),
        ("mailsync_links", "resend_all", f"BOOLEAN NOT NULL DEFAULT {false}"),
        ("mailsync_links", "resent_seq", "BIGINT NOT NULL DEFAULT 0"),
        ("mailsync_links", "report_due", f"BOOLEAN NOT NULL DEFAULT {false}"),
        ("mailsync_links", "notice_sent_at", time),
    ):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    conn.exec_driver_sql('UPDATE mailsync_leases SET ceiling = "last" + 1')


def _v5_to_v6(conn: Connection) -> None:
    """Formatted numbers: a range may carry a format (``R-{year}-{n:06}``);
    a holder's leases are found by index (a cycle asks for them)."""
    conn.exec_driver_sql("ALTER TABLE mailsync_ranges ADD COLUMN format VARCHAR(64)")
    conn.exec_driver_sql(
        'CREATE INDEX IF NOT EXISTS mailsync_leases_of ON mailsync_leases (holder, "first")'
    )


def _v6_to_v7(conn: Connection) -> None:
    """Per-link zstd dictionaries: two new tables (``create_all`` in
    :func:`ensure_schema` makes them already; this keeps the step explicit)."""
    for table in (dictionaries, dictionary_samples):
        table.create(conn, checkfirst=True)


def _v7_to_v8_column_conflicts(conn: Connection) -> None:
    """Column-level conflicts, newest-wins and manual: an update's changed
    columns and capture time in the change log, a rule's time column, a
    conflict's state and differing columns, the notes to the other side."""
    text_type = "TEXT"
    for table, column, kind in (
        ("mailsync_changes", "cols", "BIGINT"),
        ("mailsync_changes", "at", "BIGINT"),
        ("mailsync_rules", "newest_by", "VARCHAR(128)"),
        ("mailsync_conflicts", "state", "VARCHAR(8) NOT NULL DEFAULT 'settled'"),
        ("mailsync_conflicts", "source", "VARCHAR(8) NOT NULL DEFAULT 'here'"),
        ("mailsync_conflicts", "differing", text_type),
        ("mailsync_conflicts", "mine_from", "BIGINT"),
        ("mailsync_conflicts", "mine_to", "BIGINT"),
    ):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS mailsync_conflicts_row ON mailsync_conflicts (peer, tbl, pk)"
    )
    conflict_notes.create(conn, checkfirst=True)


def _stations_paused_told_and_partial_loads(conn: Connection) -> None:
    """Issue 18: a station can be disabled (and is told by mail, as a
    removed one is: ``mailsync_farewells``), a table resent to it only as
    far as rows changed since a date, and a station may ask for a reload."""
    time = _Time.compile(dialect=conn.dialect)
    true = "true" if conn.dialect.name == "postgresql" else "1"
    for table, column, kind in (
        ("mailsync_links", "paused_at", time),
        ("mailsync_links", "standing_due", "VARCHAR(16)"),
        ("mailsync_links", "table_request", "VARCHAR(32)"),
        ("mailsync_links", "request_told", f"BOOLEAN NOT NULL DEFAULT {true}"),
        ("mailsync_loads", "since_column", "VARCHAR(128)"),
        ("mailsync_loads", "since", time),
    ):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    farewells.create(conn, checkfirst=True)


def _v9_to_v10_verify(conn: Connection) -> None:
    """``mailsync verify``: the verifications table, and a link's flag that
    a verification has something for the next build."""
    verifications.create(conn, checkfirst=True)
    false = "false" if conn.dialect.name == "postgresql" else "0"
    conn.exec_driver_sql(
        f"ALTER TABLE mailsync_links ADD COLUMN verify_due BOOLEAN NOT NULL DEFAULT {false}"
    )


def _v10_to_v11_definitions(conn: Connection) -> None:
    """The schema travels: which definition of a table each station has
    (and whether a breaking change stopped it), and the definitions sent
    (``create_all`` in :func:`ensure_schema` makes ``mailsync_definitions``)."""
    for column in ("digest VARCHAR(64)", "stopped TEXT"):
        conn.exec_driver_sql(f"ALTER TABLE mailsync_loads ADD COLUMN {column}")
    definitions.create(conn, checkfirst=True)


def _v11_to_v12_workers(conn: Connection) -> None:
    """Several host workers (``serve --workers``): who they are, and the
    mail one took from the mailbox for another (both new tables)."""
    workers_table.create(conn, checkfirst=True)
    mailbag.create(conn, checkfirst=True)


#: Steps that bring the schema from version N to N + 1.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
    5: _v5_to_v6,
    6: _v6_to_v7,
    7: _v7_to_v8_column_conflicts,
    8: _stations_paused_told_and_partial_loads,
    9: _v9_to_v10_verify,
    10: _v10_to_v11_definitions,
    11: _v11_to_v12_workers,
}


def ensure_schema(engine: Engine) -> None:
    """Create the mailsync tables where missing and migrate older versions."""
    try:
        with engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)
            row = conn.execute(
                select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).first()
            version = int(row[0]) if row else SCHEMA_VERSION
            if row is None:
                conn.execute(meta_table.insert().values(key="schema_version", value=str(version)))
            if get_meta(conn, "db_id") is None:
                # names this database in its restore witness (a backup keeps it,
                # another database has its own); the generation row is locked
                # by whoever writes the witness
                conn.execute(meta_table.insert().values(key="db_id", value=secrets.token_hex(8)))
                conn.execute(meta_table.insert().values(key="witness_generation", value="0"))
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    f"{engine.url.render_as_string(hide_password=True)}: the mailsync tables are "
                    f"schema version {version}, newer than this mailsync ({SCHEMA_VERSION})",
                    hint="upgrade mailsync on this node",
                )
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    meta_table.update()
                    .where(meta_table.c.key == "schema_version")
                    .values(value=str(version))
                )
    except DatabaseError:
        raise
    except Exception as exc:
        raise describe_db_error(engine, exc, "cannot create the mailsync tables") from exc
