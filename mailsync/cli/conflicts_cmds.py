"""``mailsync conflicts list|drop``: rows changed on two nodes at once."""

from __future__ import annotations

import typer

from mailsync import admin
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
) -> None:
    """Show the recorded conflicts: which version was kept, and both versions."""
    with open_node(ctx) as node:
        found = admin.list_conflicts(node, table=table_name, limit=limit)
    if as_json:
        print_json(found)
        return
    if not found:
        console.print("no conflicts recorded")
        return
    table = grid("id", "when", "with", "table", "key", "kept", "ours", "theirs")
    for c in found:
        table.add_row(
            str(c.id),
            when(c.at),
            f"{escape(c.peer)} #{c.seq}",
            escape(c.table),
            escape(", ".join(map(str, c.key))),
            f"{c.kept} ({c.policy})",
            escape(_values(c.columns, c.ours, c.theirs)[:120]),
            escape(_values(c.columns, c.theirs, c.ours)[:120]),
        )
    console.print(table)


@conflicts_app.command("drop")
def conflicts_drop(
    ctx: typer.Context,
    ids: list[int] | None = typer.Argument(None, help="Conflict ids from `conflicts list`."),
    all_: bool = typer.Option(False, "--all", help="Every recorded conflict."),
) -> None:
    """Forget recorded conflicts once dealt with (the rows stay as they are)."""
    chosen = chosen_ids(ids, all_, "conflicts", "conflicts list")
    with open_node(ctx) as node:
        gone = admin.drop_conflicts(node, chosen)
    console.print(f"{gone} conflict record(s) dropped")


def register(app: typer.Typer) -> None:
    app.add_typer(conflicts_app, name="conflicts")
