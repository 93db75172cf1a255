"""Conflicts: one row changed on the host and on a station before either had
the other's change. Both sides must end with the same version, chosen by the
table's policy, and the version that lost must be kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from mailsync.conflicts import list_conflicts
from mailsync.store.tables import conflicts_table
from mailsync.transport.memory import MemoryPostOffice
from tests.cluster import Cluster, customers


class HoldingOffice(MemoryPostOffice):
    """Holds every message while ``holding``: both sides build before either
    hears of the other (mail that is slow, or a laptop offline)."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.held: list[tuple[str, bytes]] = []

    def deliver(self, recipient: str, raw: bytes) -> str:
        if self.holding:
            self.held.append((recipient, raw))
            return "held"
        return super().deliver(recipient, raw)

    def release(self) -> None:
        self.holding = False
        for recipient, raw in self.held:
            super().deliver(recipient, raw)
        self.held = []


def city(c: Cluster, name: str, row: int) -> str | None:
    with c.engines[name].connect() as conn:
        found = conn.execute(select(customers.c.city).where(customers.c.id == row)).first()
    return None if found is None else found[0]


def recorded(c: Cluster, name: str) -> int:
    with c.engines[name].connect() as conn:
        return len(list_conflicts(conn))


@pytest.mark.parametrize("policy", ["host-wins", "remote-wins"])
def test_both_sides_end_with_the_winner_and_keep_the_loser(
    tmp_path: Path, db_url: str, policy: str
) -> None:
    """On SQLite and with the host on PostgreSQL (its change log's keys)."""
    office = HoldingOffice()
    c = Cluster(tmp_path, db_url, ("koeln",), office=office)
    try:
        c.host.add_rule("customers", down="IUD", up="IUD", conflict=policy)
        c.execute("hq", customers.insert(), [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)])
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")

        office.holding = True
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="HQ"))
        c.execute("koeln", update(customers).where(customers.c.id == 1).values(city="Köln"))
        c.execute("hq", delete(customers).where(customers.c.id == 2))
        c.execute("koeln", update(customers).where(customers.c.id == 2).values(city="Köln"))
        c.execute("koeln", update(customers).where(customers.c.id == 3).values(city="only Köln"))
        c.sync("hq", "koeln")  # both build and send; neither hears of the other
        office.release()
        c.sync("hq", "koeln", "hq", "koeln", "hq")

        assert c.agree("customers"), (c.rows("hq", customers), c.rows("koeln", customers))
        host_wins = policy == "host-wins"
        assert city(c, "hq", 1) == ("HQ" if host_wins else "Köln")
        assert city(c, "hq", 2) == (None if host_wins else "Köln")  # deleted, or kept
        assert city(c, "hq", 3) == "only Köln"  # changed on one side only: no conflict
        with c.engines["hq"].connect() as conn:
            at_host = {tuple(x.key): x for x in list_conflicts(conn)}
        with c.engines["koeln"].connect() as conn:
            at_station = {tuple(x.key): x for x in list_conflicts(conn)}
        assert set(at_host) == set(at_station) == {(1,), (2,)}
        for side, found in (("hq", at_host), ("koeln", at_station)):
            won_here = host_wins == (side == "hq")
            one = found[(1,)]
            assert one.kept == ("ours" if won_here else "theirs") and one.policy == policy
            values = {
                "ours": dict(zip(one.columns, one.ours or [], strict=True)),
                "theirs": dict(zip(one.columns, one.theirs or [], strict=True)),
            }
            mine, other = ("HQ", "Köln") if side == "hq" else ("Köln", "HQ")
            assert values["ours"]["city"] == mine and values["theirs"]["city"] == other
            two = found[(2,)]
            deleted_here = side == "hq"
            assert (two.ours is None) == deleted_here and (two.theirs is None) != deleted_here

        # edits one after the other are not conflicts
        before = recorded(c, "hq"), recorded(c, "koeln")
        c.execute("hq", update(customers).where(customers.c.id == 3).values(city="HQ again"))
        c.sync("hq", "koeln")
        c.execute("koeln", update(customers).where(customers.c.id == 3).values(city="Köln again"))
        c.sync("koeln", "hq", "koeln")
        assert c.agree("customers") and city(c, "hq", 3) == "Köln again"
        assert (recorded(c, "hq"), recorded(c, "koeln")) == before
        with c.engines["hq"].connect() as conn:
            assert conn.execute(select(conflicts_table.c.peer).distinct()).scalars().all() == [
                "koeln"
            ]

        # what an admin sees
        config = str(c.root / "koeln" / "mailsync.toml")
        assert "2 conflict(s) recorded" in cli("-c", config, "status")
        shown = cli("-c", config, "conflicts", "list")
        assert "city='Köln'" in shown and "(no row: deleted)" in shown
        listed = json.loads(cli("-c", config, "conflicts", "list", "--json"))
        assert {tuple(x["key"]) for x in listed} == {(1,), (2,)}
        assert "2 conflict record(s) dropped" in cli("-c", config, "conflicts", "drop", "--all")
        assert recorded(c, "koeln") == 0
    finally:
        c.close()


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mailsync", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "250"},  # a table row on one line
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
