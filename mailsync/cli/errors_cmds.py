"""``mailsync errors list|retry|drop``: rows that could not be applied."""

from __future__ import annotations

import typer

from mailsync import admin_queues
from mailsync.cli.common import chosen_ids, console, escape, grid, open_node, when

errors_app = typer.Typer(
    help="Rows that could not be applied (parked, so that they never stall a link).",
    no_args_is_help=True,
)


def _ids(ids: list[int] | None, all_: bool) -> list[int] | None:
    return chosen_ids(ids, all_, "parked rows", "errors list")


@errors_app.command("list")
def errors_list(ctx: typer.Context) -> None:
    """Show the parked rows: where they came from, their values and the error."""
    with open_node(ctx) as node:
        rows = admin_queues.parked_rows(node)
    if not rows:
        console.print("no parked rows")
        return
    table = grid("id", "from", "table", "op", "values", "error", "parked")
    for r in rows:
        values = ", ".join(f"{k}={v!r}" for k, v in r.values.items())
        table.add_row(
            str(r.id),
            f"{r.peer} #{r.seq}",
            r.table,
            r.op,
            escape(values[:120]),
            escape(r.error),
            when(r.parked_at),
        )
    console.print(table)


@errors_app.command("retry")
def errors_retry(
    ctx: typer.Context,
    ids: list[int] | None = typer.Argument(None, help="Parked row ids."),
    all_: bool = typer.Option(False, "--all", help="Every parked row."),
) -> None:
    """Apply parked rows again (after fixing the cause)."""
    chosen = _ids(ids, all_)
    with open_node(ctx) as node:
        done, failed = admin_queues.retry_parked(node, chosen)
    console.print(f"{done} row(s) applied, {failed} still parked")
    if failed:
        raise typer.Exit(5)


@errors_app.command("drop")
def errors_drop(
    ctx: typer.Context,
    ids: list[int] | None = typer.Argument(None, help="Parked row ids."),
    all_: bool = typer.Option(False, "--all", help="Every parked row."),
) -> None:
    """Forget parked rows (their change is given up on this node)."""
    chosen = _ids(ids, all_)
    with open_node(ctx) as node:
        dropped = admin_queues.drop_parked(node, chosen)
    console.print(f"{dropped} parked row(s) dropped")


def register(app: typer.Typer) -> None:
    app.add_typer(errors_app, name="errors")
