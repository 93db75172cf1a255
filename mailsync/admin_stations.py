"""Admin commands about a station's standing and its own reload requests,
beside :mod:`mailsync.admin` (same shape: each owns its transaction and
writes its log line; an operator's mistake raises before any change).

- ``station disable S`` / ``station enable S`` (host): :mod:`mailsync.standing`.
- ``reload --table T [--since DATE | --full]`` run on a station: ask the
  host for tables again (:mod:`mailsync.table_requests`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync import standing, table_requests
from mailsync.admin import Site
from mailsync.errors import ConfigError, RuleError


def _host_only(site: Site) -> None:
    if site.config.role != "host":
        raise ConfigError(
            f"a station is disabled or enabled on the host; {site.config.node_id!r} is a remote"
        )


def disable_station(site: Site, station_id: str) -> None:
    """Pause a station: nothing goes to it from the next cycle on (but the
    notice telling it so); what it sends is held, applied once enabled."""
    _host_only(site)
    with site.engine.begin() as conn:
        rules_mod.get_station(conn, station_id)
        if not standing.disable(conn, station_id):
            since = links_mod.one(conn, station_id).paused_at
            raise RuleError(
                f"station {station_id} is disabled already"
                + (f" (since {since:%Y-%m-%d %H:%M} UTC)" if since is not None else ""),
                hint=f"`mailsync station enable {station_id}` lets it sync again",
            )
        site.journal.warning(
            "station",
            f"station {station_id} disabled: nothing is sent to it, what it sends is held "
            "(it is told with the next cycle)",
            conn=conn,
            peer=station_id,
        )


def enable_station(site: Site, station_id: str) -> None:
    """Let a disabled station sync again: what it sent meanwhile is applied
    with the next cycle, what waits for it goes, and it is told."""
    _host_only(site)
    with site.engine.begin() as conn:
        rules_mod.get_station(conn, station_id)
        if not standing.enable(conn, station_id):
            raise RuleError(f"station {station_id} is not disabled: nothing to enable")
        site.journal.info(
            "station",
            f"station {station_id} enabled: what it sent meanwhile is applied with the next "
            "cycle, and it is told",
            conn=conn,
            peer=station_id,
        )


def request_reload(
    site: Site,
    tables: Iterable[str] = (),
    *,
    since: dt.datetime | None = None,
    column: str | None = None,
) -> tuple[str, list[str]]:
    """On a station: ask the host to send ``tables`` (default: every one it
    sends us inserts of) again, in full or changed since ``since``; goes
    with the next sync. Returns the host's id and the tables named."""
    if site.config.role == "host":
        raise ConfigError(
            "on the host, name the station: `mailsync reload --station S [--table T]`"
        )
    wanted = sorted(set(tables))
    with site.engine.begin() as conn:
        peers = links_mod.peers(conn)
        if not peers:
            raise ConfigError(
                "this station has not joined a host yet", hint="`mailsync join BUNDLE`"
            )
        host = peers[0]
        request = table_requests.ask(conn, host, wanted, since=since, column=column)
        what = ", ".join(wanted) or "every table it sends"
        how = "in full" if since is None else f"changed since {since:%Y-%m-%d %H:%M} UTC"
        site.journal.info(
            "reload-request",
            f"asked host {host} to send {what} again {how} (request {request})",
            conn=conn,
            peer=host,
        )
    return host, wanted
