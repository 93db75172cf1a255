"""`mailsync reload --station S [--table T]` (issue 18, item 2 in part).

A station's copy of a table drifted behind mailsync's back (a row changed,
one deleted, one added, with capture bypassed as a repair script would);
the admin sends the table again in full: the station's copy is the host's
again, what the station itself changed and had not delivered is kept, the
other tables are untouched, and a second request is harmless. The host runs
on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from mailsync.errors import MailsyncError, RuleError
from mailsync.store.tables import applying, log_table
from tests.cluster import Cluster, customers, notes


def logged(c: Cluster) -> list[tuple[str, str]]:
    with c.engines["hq"].connect() as conn:
        return [(e, m) for e, m in conn.execute(select(log_table.c.event, log_table.c.message))]


def behind_the_back(engine: Engine) -> None:
    """Edits a repair script makes, not captured for sending (the apply
    flag of the capture triggers is set, as for rows from the host)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(applying.insert().values(origin="hq"))
        conn.execute(update(customers).where(customers.c.id == 1).values(name="drifted"))
        conn.execute(customers.delete().where(customers.c.id == 2))
        conn.execute(customers.insert().values(id=99, name="only here"))
        conn.execute(update(notes).where(notes.c.owner == "hq").values(body="drifted too"))
        if engine.dialect.name == "sqlite":
            conn.execute(applying.delete())


def test_a_table_sent_again_in_full_replaces_the_stations_copy(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.add_rule("notes", down="IUD", up="none")
        c.execute("hq", customers.insert(), [{"id": i, "name": f"c{i}"} for i in range(1, 6)])
        c.execute("hq", notes.insert(), {"owner": "hq", "topic": "t", "body": "b"})
        c.converge()
        assert c.agree("customers", "notes")
        behind_the_back(c.engines["koeln"])
        c.converge()
        assert not c.agree("customers")  # nothing noticed it
        # the station's own change, made before the reload arrives, is kept
        c.execute("koeln", customers.insert(), {"id": 50, "name": "koeln's own"})
        assert c.host.reload_station("koeln", ["customers"]) == ["customers"]
        assert c.host.reload_station("koeln", ["customers"]) == ["customers"]  # twice: one
        c.converge()
        c.converge()
        assert c.agree("customers")
        assert 50 in [r[0] for r in c.rows("hq", customers)]
        assert 99 not in [r[0] for r in c.rows("koeln", customers)]
        # notes were not asked for: koeln's drifted copy stays as it is
        assert c.rows("koeln", notes)[0][2] == "drifted too"
        c.host.reload_station("koeln")  # every table it gets
        c.converge()
        assert c.agree("customers", "notes")
        said = [m for e, m in logged(c) if e == "reload" and "sent again in full" in m]
        assert len(said) == 3, said
    finally:
        c.close()


def test_a_reload_the_rules_cannot_serve_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="UD", up="IUD")
        for station, tables, words in (
            ("ghost", [], "no station 'ghost'"),
            ("koeln", ["notes"], "table 'notes' does not travel to koeln"),
            ("koeln", ["customers"], "sends no inserts down"),
            ("koeln", [], "nothing to reload"),
        ):
            with pytest.raises(RuleError, match=words):
                c.host.reload_station(station, tables)
        with pytest.raises(MailsyncError, match="on the host"):
            c.nodes["koeln"].reload_station("koeln")
        assert not [m for e, m in logged(c) if e == "reload"]
    finally:
        c.close()
