"""``mailsync status --format openmetrics``: the node for a metrics scraper.

The text is OpenMetrics 1.0 (``# EOF`` at the end), every name prefixed
``mailsync_``, every family a gauge, label values escaped (a station label
may hold a quote, a backslash or a line break), meant for the node
exporter's textfile collector: a timer runs ``mailsync status --format
openmetrics > /var/lib/node_exporter/mailsync.prom.tmp`` and renames it.

It shows what ``status`` shows — per link its backlog (changes pending,
messages unsent, changesets unacknowledged or buffered), last contact,
whether it is held, its parked rows and conflicts; per range the numbers
left here — plus the last cycle: when, how long, whether it succeeded.
``sync`` and ``serve`` record that after every cycle (:func:`record_cycle`,
one row of ``mailsync_meta``, outside the cycle's own transactions).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select

from mailsync.status import Status
from mailsync.store.tables import conflicts_table, get_meta, parked, set_meta, stations

#: the mailsync_meta key of the last cycle's record
LAST_CYCLE = "last_cycle"


@dataclass(frozen=True)
class LastCycle:
    """When the last cycle ended, how long it took, and whether it succeeded."""

    at: dt.datetime
    seconds: float
    ok: bool


def record_cycle(engine: Engine, at: dt.datetime, seconds: float, ok: bool) -> None:
    """Remember the cycle that just ended (for metrics), in one small commit."""
    value = json.dumps({"at": at.isoformat(), "seconds": round(seconds, 6), "ok": ok})
    with engine.begin() as conn:
        set_meta(conn, LAST_CYCLE, value)


def last_cycle(conn: Connection) -> LastCycle | None:
    value = get_meta(conn, LAST_CYCLE)
    if not value:
        return None
    try:
        data = json.loads(value)
        at = dt.datetime.fromisoformat(data["at"])
        return LastCycle(
            at if at.tzinfo else at.replace(tzinfo=dt.UTC),
            float(data["seconds"]),
            bool(data["ok"]),
        )
    except (ValueError, KeyError, TypeError):
        return None  # a record no version of mailsync wrote: as if none


@dataclass(frozen=True)
class Extra:
    """What ``Status`` counts in total and metrics want per peer, and more."""

    parked: dict[str, int]
    conflicts: dict[str, int]
    labels: dict[str, str]
    last: LastCycle | None


def read_extra(engine: Engine) -> Extra:
    """Parked rows and conflicts per peer, station labels, the last cycle:
    three statements and a meta read, whatever the number of links."""
    with engine.connect() as conn:
        per_peer: list[dict[str, int]] = [
            dict(conn.execute(select(t.c.peer, func.count()).group_by(t.c.peer)).tuples().all())
            for t in (parked, conflicts_table)
        ]
        labels = dict(conn.execute(select(stations.c.id, stations.c.label)).tuples().all())
        last = last_cycle(conn)
    return Extra(per_peer[0], per_peer[1], labels, last)


def escape(value: str) -> str:
    """A label value as OpenMetrics writes it: backslash, quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _stamp(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()


class _Text:
    """Families in order, each with its TYPE and HELP once."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.lines: list[str] = []

    def family(
        self, name: str, help_: str, samples: Iterable[tuple[dict[str, str], float | None]]
    ) -> None:
        full = f"mailsync_{name}"
        self.lines.append(f"# TYPE {full} gauge")
        self.lines.append(f"# HELP {full} {help_}")
        for labels, value in samples:
            if value is None:
                continue  # never happened: no sample, rather than a made-up zero
            every = {"node": self.node, **labels}
            text = ",".join(f'{k}="{escape(v)}"' for k, v in every.items())
            self.lines.append(f"{full}{{{text}}} {_number(value)}")

    def one(self, name: str, help_: str, value: float | None) -> None:
        self.family(name, help_, [({}, value)])

    def text(self) -> str:
        return "\n".join([*self.lines, "# EOF"]) + "\n"


def openmetrics(st: Status, extra: Extra, *, service_running: bool, service_crashed: bool) -> str:
    """The node's state as OpenMetrics text (see the module's docstring)."""
    out = _Text(st.node_id)
    out.family("info", "This node: its role (always 1).", [({"role": st.role}, 1)])
    links = st.links
    if st.role == "host":
        out.family(
            "station_info",
            "A station this host serves, with its label and address (always 1).",
            [
                ({"peer": x.peer, "label": extra.labels.get(x.peer, ""), "address": x.address}, 1)
                for x in links
            ],
        )
    per_link: list[tuple[str, str, list[tuple[dict[str, str], float | None]]]] = [
        (
            "link_pending_changes",
            "Changes logged here and not yet packed for the peer.",
            [({"peer": x.peer}, x.pending_changes) for x in links],
        ),
        (
            "link_unsent_messages",
            "Messages (parts) for the peer not handed to the mail system yet.",
            [({"peer": x.peer}, x.unsent) for x in links],
        ),
        (
            "link_unacked_changesets",
            "Changesets sent to the peer and not acknowledged yet.",
            [({"peer": x.peer}, x.unacked) for x in links],
        ),
        (
            "link_buffered_changesets",
            "Changesets from the peer buffered here, waiting for a predecessor or a part.",
            [({"peer": x.peer}, x.buffered) for x in links],
        ),
        (
            "link_quarantined_changesets",
            "Changesets from the peer no longer tried by themselves (mailsync inbox).",
            [({"peer": x.peer}, x.quarantined) for x in links],
        ),
        (
            "link_held",
            "1 while the peer's changesets do not apply (the link is held).",
            [({"peer": x.peer}, x.held is not None) for x in links],
        ),
        (
            "link_last_contact_timestamp_seconds",
            "When a message from the peer last arrived (Unix time); absent: never.",
            [({"peer": x.peer}, _stamp(x.last_contact)) for x in links],
        ),
        (
            "link_parked_rows",
            "Rows from the peer that could not be applied and are parked.",
            [({"peer": x.peer}, extra.parked.get(x.peer, 0)) for x in links],
        ),
        (
            "link_conflicts",
            "Conflicts with the peer recorded and not dropped.",
            [({"peer": x.peer}, extra.conflicts.get(x.peer, 0)) for x in links],
        ),
    ]
    for name, help_, samples in per_link:
        out.family(name, help_, samples)
    out.family(
        "range_left",
        "Numbers of the range left in this node's leases.",
        [({"range": r.name}, r.left) for r in st.ranges],
    )
    out.one("parked_rows", "Rows parked here, all peers.", st.parked)
    out.one("conflicts", "Conflicts recorded here, all peers.", st.conflicts)
    out.one("set_aside_messages", "Messages set aside within the log's retention.", st.set_aside)
    out.one(
        "capture_missing_tables",
        "Synced tables whose capture triggers are missing.",
        len(st.capture_missing),
    )
    last = extra.last
    out.one(
        "last_cycle_timestamp_seconds",
        "When the last sync cycle ended (Unix time); absent: none recorded.",
        _stamp(last.at) if last else None,
    )
    out.one(
        "last_cycle_duration_seconds",
        "How long the last sync cycle took.",
        last.seconds if last else None,
    )
    out.one(
        "last_cycle_success",
        "1 when the last sync cycle met no error, 0 when it did.",
        last.ok if last else None,
    )
    out.one("service_running", "1 while mailsync serve runs for this node.", service_running)
    out.one(
        "service_crashed",
        "1 when mailsync serve is gone without stopping (killed, crashed).",
        service_crashed,
    )
    return out.text()
