"""``mailsync inbox list|show|retry|drop``: changesets waiting to apply."""

from __future__ import annotations

import typer

from mailsync import admin_queues
from mailsync.cli.common import age, console, escape, grid, open_node, print_json, when
from mailsync.inbox import Buffered

inbox_app = typer.Typer(
    help="Changesets received and not applied yet: early, incomplete, failing or quarantined.",
    no_args_is_help=True,
)

_SEQ = typer.Argument(..., help="The changeset's sequence number (from `inbox list`).", min=1)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n} {unit}"
        n //= 1000
    return f"{n} GB"


def _record(b: Buffered) -> dict[str, object]:
    return {
        "peer": b.peer,
        "seq": b.seq,
        "cid": b.cid,
        "after": b.base,
        "parts": b.parts,
        "present": b.present,
        "bytes": b.size,
        "first_received": b.first_received,
        "last_received": b.last_received,
        "attempts": b.attempts,
        "last_error": b.last_error,
        "quarantined_at": b.quarantined_at,
        "next_in_line": b.next_in_line,
        "state": b.state,
    }


@inbox_app.command("list")
def inbox_list(
    ctx: typer.Context,
    peer: str | None = typer.Argument(None, help="Only this peer's."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show what waits in the inbox, per peer, and why."""
    with open_node(ctx) as node:
        found = admin_queues.inbox_list(node, peer)
    if as_json:
        print_json([_record(b) for b in found])
        return
    if not found:
        console.print("the inbox is empty" + (f" for {escape(peer)}" if peer else ""))
        return
    table = grid("from", "#", "parts", "size", "received", "state", "last error")
    for b in found:
        colour = "red" if b.quarantined_at or b.attempts else ""
        table.add_row(
            escape(b.peer),
            str(b.seq),
            f"{b.present}/{b.parts}",
            _size(b.size),
            f"{age(b.first_received)} ago",
            f"[{colour}]{escape(b.state)}[/]" if colour else escape(b.state),
            escape((b.last_error or "")[:100]),
        )
    console.print(table)


@inbox_app.command("show")
def inbox_show(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The sending peer."),
    seq: int = _SEQ,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one buffered changeset: parts, size, failures, why it waits."""
    with open_node(ctx) as node:
        b = admin_queues.inbox_show(node, peer, seq)
    if as_json:
        print_json(_record(b))
        return
    console.print(f"changeset #{b.seq} from {escape(b.peer)} (id {b.cid}), after #{b.base}")
    console.print(f"parts: {b.present} of {b.parts} here, {_size(b.size)} sealed")
    console.print(f"received: {when(b.first_received)} … {when(b.last_received)}")
    console.print(f"state: {escape(b.state)}")
    if b.last_error:
        console.print(f"[red]last error ({b.attempts} attempt(s)):[/] {escape(b.last_error)}")
    if b.quarantined_at is not None:
        console.print(
            f"quarantined at {when(b.quarantined_at)}: `mailsync inbox retry {escape(peer)} "
            f"{seq}` once the cause is fixed, or `mailsync inbox drop {escape(peer)} {seq} "
            "--skip` to do without it"
        )


@inbox_app.command("retry")
def inbox_retry(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The sending peer."),
    seq: int | None = typer.Argument(None, help="Only this changeset.", min=1),
) -> None:
    """Try a peer's waiting changesets again with the next sync (after fixing
    the cause): failures forgotten, quarantine lifted, missing parts asked for."""
    with open_node(ctx) as node:
        chosen = admin_queues.inbox_retry(node, peer, seq)
    console.print(
        f"{len(chosen)} changeset(s) from {escape(peer)} are tried again with the next sync"
    )


@inbox_app.command("drop")
def inbox_drop(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The sending peer."),
    seq: int = _SEQ,
    skip: bool = typer.Option(
        False,
        "--skip",
        help="It is next in line: move the link past it; it is never applied here.",
    ),
) -> None:
    """Drop a buffered changeset. One waiting for its turn is asked for again;
    the one next in line needs --skip, and its rows are then missing here."""
    with open_node(ctx) as node:
        admin_queues.inbox_drop(node, peer, seq, skip=skip)
    if skip:
        console.print(
            f"[bold yellow]changeset #{seq} from {escape(peer)} skipped[/]: its rows are not "
            "on this node; the link goes on with the next one"
        )
    else:
        console.print(f"changeset #{seq} from {escape(peer)} dropped; it is asked for again")


def register(app: typer.Typer) -> None:
    app.add_typer(inbox_app, name="inbox")
