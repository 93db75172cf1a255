"""``mailsync conflicts list|resolve|drop``: rows changed on two nodes at once."""

from __future__ import annotations

import typer

from mailsync import admin_queues
from mailsync.cli.common import chosen_ids, console, escape, grid, open_node, print_json, when

conflicts_app = typer.Typer(
    help="Rows changed here and at a peer before either had the other's change.",
    no_args_is_help=True,
)


def _values(columns: list[str], values: list[object] | None, other: list[object] | None) -> str:
    """The values that differ from the other version (a deleted row: 'deleted')."""
    if values is None:
        return "(no row: deleted)"
    theirs = dict(zip(columns, other or [None] * len(columns), strict=True))
    shown = [
        f"{k}={v!r}"
        for k, v in zip(columns, values, strict=True)
        if other is None or theirs[k] != v
    ]
    return ", ".join(shown) or "(the same values)"


@conflicts_app.command("list")
def conflicts_list(
    ctx: typer.Context,
    table_name: str | None = typer.Option(None, "--table", help="Only this table's."),
    limit: int = typer.Option(50, "--limit", help="The newest N.", min=1),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable, every value."),
    waiting: bool = typer.Option(
        False, "--waiting", help="Only those waiting for a decision (manual policy)."
    ),
) -> None:
    """Show the recorded conflicts: which version was kept, and both versions."""
    with open_node(ctx) as node:
        found = admin_queues.list_conflicts(node, table=table_name, limit=limit, waiting=waiting)
    if as_json:
        print_json(found)
        return
    if not found:
        console.print("no conflicts waiting" if waiting else "no conflicts recorded")
        return
    table = grid("id", "when", "with", "table", "key", "kept", "ours", "theirs")
    for c in found:
        table.add_row(
            str(c.id),
            when(c.at),
            f"{escape(c.peer)} #{c.seq}",
            escape(c.table),
            escape(", ".join(map(str, c.key))),
            _kept(c.kept, c.policy, c.state),
            escape(_values(c.columns, c.ours, c.theirs)[:120]),
            escape(_values(c.columns, c.theirs, c.ours)[:120]),
        )
    console.print(table)


def _kept(kept: str, policy: str, state: str) -> str:
    if state == "waiting":
        return f"WAITING ({policy}: ours stays)"
    return f"{kept} ({'resolved' if state == 'resolved' else policy})"


@conflicts_app.command("resolve")
def conflicts_resolve(
    ctx: typer.Context,
    conflict_id: int = typer.Argument(..., help="A waiting conflict's id (`conflicts list`)."),
    keep: str = typer.Option(..., "--keep", help="host or station: whose version stays."),
) -> None:
    """Decide a conflict waiting under the manual policy (on the host); the
    station hears of it with the next sync, and both end with that version."""
    if keep not in ("host", "station"):
        raise typer.BadParameter("use host or station", param_hint="--keep")
    with open_node(ctx) as node:
        record = admin_queues.resolve_conflict(
            node, conflict_id, "host" if keep == "host" else "station"
        )
    who = "the host's" if keep == "host" else f"{record.peer}'s"
    console.print(
        f"conflict {conflict_id} resolved: {who} version of {escape(record.table)} "
        f"row {escape(', '.join(map(str, record.key)))} kept; {record.peer} hears of it "
        "with the next sync"
    )


@conflicts_app.command("drop")
def conflicts_drop(
    ctx: typer.Context,
    ids: list[int] | None = typer.Argument(None, help="Conflict ids from `conflicts list`."),
    all_: bool = typer.Option(False, "--all", help="Every recorded conflict."),
) -> None:
    """Forget recorded conflicts once dealt with (the rows stay as they are)."""
    chosen = chosen_ids(ids, all_, "conflicts", "conflicts list")
    with open_node(ctx) as node:
        gone = admin_queues.drop_conflicts(node, chosen)
    console.print(f"{gone} conflict record(s) dropped")


def register(app: typer.Typer) -> None:
    app.add_typer(conflicts_app, name="conflicts")
