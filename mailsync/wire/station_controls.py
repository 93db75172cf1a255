"""The controls of a station's standing and of its own reload requests
(issue 18), parsed as strictly as those of :mod:`mailsync.wire.controls`.

=============  ========================  ==================================
kind           dataclass                 what it says
=============  ========================  ==================================
``standing``   :class:`StationStanding`  host → station, unsequenced: an
                                         admin disabled, enabled or removed
                                         the station
``tables?``    :class:`TablesWanted`     station → host, unsequenced: send
                                         me these tables again (in full, or
                                         the rows changed since a date)
``served``     :class:`RequestServed`    host → station, sequenced: your
                                         request is acted on
=============  ========================  ==================================

They live apart from :mod:`mailsync.wire.controls` (which this module
reuses for its field checks) and are tried after it: a peer one version
behind ignores these kinds, as it ignores any it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailsync.wire.controls import _dict, _fail, _list, _str

#: What a host may tell a station of its standing.
STANDINGS = ("disabled", "enabled", "removed")


@dataclass(frozen=True)
class StationStanding:
    """Host → station: an admin disabled, enabled or removed the station
    (``at``: when, ISO 8601, as the host's clock says)."""

    state: str
    at: str

    KIND = "standing"

    def payload(self) -> dict[str, Any]:
        return {"state": self.state, "at": self.at}

    @classmethod
    def parse(cls, payload: Any) -> StationStanding:
        data = _dict(cls.KIND, payload, "the notice")
        state = _str(cls.KIND, data.get("state"), "state", limit=16)
        if state not in STANDINGS:
            raise _fail(cls.KIND, f"state {state[:20]!r} is not one of {', '.join(STANDINGS)}")
        return cls(state, _str(cls.KIND, data.get("at"), "at", limit=40))


@dataclass(frozen=True)
class TablesWanted:
    """Station → host: send me these tables again — in full (replacing my
    copy), or only the rows changed since ``since`` (ISO 8601) by the
    timestamp ``column`` (None: the host picks it). ``request`` tells a
    copy of a request from a new one."""

    request: str
    tables: tuple[str, ...]
    since: str | None = None
    column: str | None = None

    KIND = "tables?"

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.request,
            "tables": list(self.tables),
            "since": self.since,
            "column": self.column,
        }

    @classmethod
    def parse(cls, payload: Any) -> TablesWanted:
        data = _dict(cls.KIND, payload, "the request")
        request = _str(cls.KIND, data.get("id"), "id", limit=32)
        tables = tuple(
            _str(cls.KIND, t, "a table name")
            for t in _list(cls.KIND, data.get("tables", []), "tables")
        )
        since, column = data.get("since"), data.get("column")
        if since is not None:
            since = _str(cls.KIND, since, "since", limit=40)
        if column is not None:
            column = _str(cls.KIND, column, "column")
        return cls(request, tables, since, column)


@dataclass(frozen=True)
class RequestServed:
    """Host → station, in a changeset: the station's own reload request
    ``request`` was acted on (what it asked for comes in this changeset or
    the next ones)."""

    request: str

    KIND = "served"

    def payload(self) -> str:
        return self.request

    @classmethod
    def parse(cls, payload: Any) -> RequestServed:
        return cls(_str(cls.KIND, payload, "the request id", limit=32))


StationControl = StationStanding | TablesWanted


def parse_unsequenced(kind: str, payload: Any, *, from_host: bool) -> StationControl | None:
    """One of this module's unsequenced kinds, checked (None: not one, or
    not one the sending side may send)."""
    if kind == StationStanding.KIND and from_host:
        return StationStanding.parse(payload)
    if kind == TablesWanted.KIND and not from_host:
        return TablesWanted.parse(payload)
    return None


def parse_sequenced(kind: str, payload: Any) -> RequestServed | None:
    return RequestServed.parse(payload) if kind == RequestServed.KIND else None
