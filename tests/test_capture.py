"""Capture triggers on SQLite and PostgreSQL: what they log, and with which origin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete, event, select, text, update

from mailsync import capture
from mailsync.dialects import dialect_for
from mailsync.store.engine import open_engine
from mailsync.store.migrations import ensure_schema
from mailsync.store.tables import changes
from tests.cluster import customers, notes, schema


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = open_engine(db_url)
    schema.create_all(eng)
    ensure_schema(eng)
    with eng.begin() as conn:
        capture.ensure_capture(conn, ["customers", "notes"])
    yield eng
    eng.dispose()


def logged(engine: Engine) -> list[tuple[str, str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(changes.c.tbl, changes.c.pk, changes.c.op, changes.c.origin).order_by(
                changes.c.id
            )
        ).all()
    return [(t, pk.replace(" ", ""), op, origin) for t, pk, op, origin in rows]


def test_insert_update_delete_are_logged(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(customers.insert(), [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)])
        conn.execute(update(customers).where(customers.c.id >= 2).values(name="x"))
        conn.execute(delete(customers).where(customers.c.id == 3))
    assert logged(engine) == [
        ("customers", "[1]", "I", None),
        ("customers", "[2]", "I", None),
        ("customers", "[3]", "I", None),
        ("customers", "[2]", "U", None),
        ("customers", "[3]", "U", None),
        ("customers", "[3]", "D", None),
    ]


def test_moving_a_key_logs_a_delete_of_the_old_one(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(notes.insert(), {"owner": "a", "topic": "t1", "body": "x"})
        conn.execute(update(notes).values(topic="t2"))
    assert logged(engine)[1:] == [
        ("notes", '["a","t1"]', "D", None),
        ("notes", '["a","t2"]', "U", None),
    ]


def test_changes_applied_from_a_peer_carry_its_origin(engine: Engine) -> None:
    dialect = dialect_for(engine)
    with engine.begin() as conn:
        dialect.begin_apply(conn, "koeln")
        conn.execute(customers.insert(), {"id": 7, "name": "from koeln"})
        dialect.end_apply(conn)
        conn.execute(customers.insert(), {"id": 8, "name": "local, same transaction"})
    with engine.begin() as conn:
        conn.execute(customers.insert(), {"id": 9, "name": "local"})
    assert [(pk, origin) for _, pk, _, origin in logged(engine)] == [
        ("[7]", "koeln"),
        ("[8]", None),
        ("[9]", None),
    ]


def test_a_rolled_back_apply_leaves_no_origin_behind(engine: Engine) -> None:
    dialect = dialect_for(engine)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        dialect.begin_apply(conn, "koeln")
        raise RuntimeError("crash mid-apply")
    with engine.begin() as conn:
        conn.execute(customers.insert(), {"id": 1, "name": "local"})
    assert logged(engine) == [("customers", "[1]", "I", None)]


def test_missing_or_altered_triggers_are_found_and_repaired(engine: Engine) -> None:
    with engine.begin() as conn:
        assert capture.check_capture(conn, ["customers", "notes"]) == []
        conn.execute(
            text(
                'DROP TRIGGER "mailsync_customers_ad"'
                + (" ON customers" if engine.dialect.name == "postgresql" else "")
            )
        )
        assert capture.check_capture(conn, ["customers", "notes"]) == ["customers"]
        assert capture.ensure_capture(conn, ["customers", "notes"]) == ["customers"]
        assert capture.check_capture(conn, ["customers", "notes"]) == []


def test_the_capture_check_reads_nothing_again_until_the_schema_changes(engine: Engine) -> None:
    """Every cycle checks the triggers; with the fingerprint unchanged since a
    check that found them whole it costs one fingerprint query (SQLite: one
    for all tables), and a trigger dropped since is still found."""
    seen: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not statement.startswith("BEGIN"):
            seen.append(statement)

    tables = ["customers", "notes"]
    with engine.begin() as conn:
        assert capture.ensure_capture(conn, tables) == []  # a full check: whole
    event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.begin() as conn:
            assert capture.ensure_capture(conn, tables) == []
        expected = 1 if engine.dialect.name == "sqlite" else 2
        assert len(seen) == expected, seen
        with engine.begin() as conn:
            conn.execute(
                text(
                    'DROP TRIGGER "mailsync_notes_au"'
                    + (" ON notes" if engine.dialect.name == "postgresql" else "")
                )
            )
        with engine.begin() as conn:
            assert capture.ensure_capture(conn, tables) == ["notes"]
        with engine.begin() as conn:
            assert capture.check_capture(conn, tables) == []
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_horizon_covers_every_committed_change(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(customers.insert(), [{"id": i, "name": "n"} for i in range(1, 51)])
    horizon = dialect_for(engine).change_horizon(engine)
    with engine.connect() as conn:
        assert horizon == conn.execute(select(changes.c.id).order_by(changes.c.id.desc())).scalar()
