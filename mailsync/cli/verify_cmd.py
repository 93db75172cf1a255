"""``mailsync verify``: do a station and the host hold the same rows? (host)."""

from __future__ import annotations

import typer

from mailsync import admin
from mailsync.cli.common import console, escape, grid, open_node, print_json, when
from mailsync.verification import Verification

#: ``--every``'s default: seconds between cycles while ``--wait`` waits
EVERY = 30.0


def _keys(v: Verification) -> str:
    shown = []
    for f in v.found[:5]:
        side = "both" if f.host and f.station else "host only" if f.host else "station only"
        shown.append(f"{', '.join(map(str, f.key))} ({side})")
    return "; ".join(shown) + (" …" if len(v.found) > 5 else "")


def _show(found: list[Verification], as_json: bool) -> None:
    if as_json:
        print_json([v.to_json() for v in found])
        return
    if not found:
        console.print("no verification yet (start one with `mailsync verify`)")
        return
    table = grid("id", "station", "table", "state", "started", "rows equal", "differ", "keys")
    for v in found:
        table.add_row(
            str(v.id),
            escape(v.station),
            escape(v.table),
            v.state + (f": {escape(v.error)}" if v.error else ""),
            when(v.started_at),
            f"{v.rows_compared:,}",
            str(v.differing),
            escape(_keys(v)),
        )
    console.print(table)


def verify(
    ctx: typer.Context,
    station: str | None = typer.Option(
        None, "--station", help="Only this station (default: every station)."
    ),
    table: str | None = typer.Option(
        None, "--table", help="Only this table (default: every table that travels)."
    ),
    repair: bool = typer.Option(
        False, "--repair", help="Send the differing rows again from the side that owns them."
    ),
    wait: float = typer.Option(
        0,
        "--wait",
        metavar="SECONDS",
        min=0,
        help="Run sync cycles until the verifications end, at most so long (0: start, return).",
    ),
    every: float = typer.Option(
        EVERY, "--every", metavar="SECONDS", min=0, help="Seconds between cycles while waiting."
    ),
    show: bool = typer.Option(
        False, "--show", help="Start nothing: show the last verification of each station and table."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable, every key."),
) -> None:
    """Prove that stations hold the host's rows, and name those that differ (host).

    Checksums over key ranges travel by mail with the next syncs, narrowed
    round by round to the differing keys: a verification takes a few
    round trips of the mail. By default it starts and returns (see the
    result with `mailsync verify --show` or `mailsync status`); --wait runs
    cycles until it ends. Exit code 1 when rows differ, a verification
    failed or is still running at the end of --wait."""
    with open_node(ctx) as node:
        if show:
            _show(admin.verifications(node, station, table), as_json)
            return
        started = node.verify(station, table, repair=repair)
        if wait > 0:
            found = admin.wait_verified(node, [v.id for v in started], node.sync, wait, every)
        else:
            found = started
    if wait <= 0 and not as_json:
        for v in started:
            console.print(
                f"verification #{v.id} of {escape(v.table)} at {escape(v.station)} started"
                + (" (with repair)" if repair else "")
            )
        console.print(
            "it goes with the next syncs; see `mailsync verify --show` or `mailsync status`"
        )
        return
    _show(found, as_json)
    if wait > 0 and not all(v.equal or v.state == "repaired" for v in found):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
