"""``mailsync range ...`` (host) and ``mailsync number next`` (any node)."""

from __future__ import annotations

import datetime as dt

import typer

from mailsync import admin
from mailsync.cli.common import console, escape, new_table, open_node, when
from mailsync.ranges.draw import next_number
from mailsync.ranges.model import DEFAULT_MAX_BLOCKS, DEFAULT_THRESHOLD, RangeSpec

range_app = typer.Typer(
    help="Number ranges: the host leases blocks of customer or invoice numbers to stations.",
    no_args_is_help=True,
)
number_app = typer.Typer(help="Draw numbers from this node's leases.", no_args_is_help=True)


@range_app.command("add")
def range_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The range's name, e.g. invoice_no."),
    start: int = typer.Option(..., "--start", help="The first number of the series."),
    end: int = typer.Option(..., "--end", help="The last number of the series."),
    block: int = typer.Option(50, "--block", help="Numbers per lease."),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD,
        "--threshold",
        help="A station asks for its next block when the unused share of its current one "
        "falls under this.",
    ),
    max_blocks: int = typer.Option(
        DEFAULT_MAX_BLOCKS,
        "--max-blocks",
        help="At most this many blocks a station has not drawn from.",
    ),
    bind: str | None = typer.Option(
        None,
        "--bind",
        help="TABLE.COLUMN: filled from the node's leases when an insert leaves it empty; "
        "a number outside them is refused.",
    ),
    station: list[str] = typer.Option(
        [], "--station", help="Lease only to this station (repeatable) [default: all]."
    ),
    number_format: str | None = typer.Option(
        None,
        "--format",
        help="Numbers as text, e.g. 'R-{year}-{n:06}' ({n} or {n:0W} once, {year} at most "
        "once); a bound column must be text.",
    ),
) -> None:
    """Define a number series; stations get their first block with their next sync."""
    stations = tuple(station) or None
    spec = RangeSpec(name, start, end, block, threshold, max_blocks, bind, stations, number_format)
    with open_node(ctx) as node:
        rdef = admin.add_range(node, spec)
    bound = f", bound to {rdef.bind_text}" if rdef.bind else ""
    example = str(rdef.text_of(rdef.first, dt.date.today().year))
    shown = f", numbers like {escape(example)}" if rdef.format else ""
    console.print(
        f"range [bold]{rdef.name}[/] {rdef.first}-{rdef.last}, blocks of {block}{bound}{shown}"
    )


@range_app.command("list")
def range_list(ctx: typer.Context) -> None:
    """The ranges with their leases in use."""
    with open_node(ctx) as node:
        found = admin.list_ranges(node)
    if not found:
        console.print("no number ranges (`mailsync range add`)")
        return
    table = new_table(show_edge=False)
    for col in ("range", "numbers", "block", "threshold", "bound to", "stations", "leases", "left"):
        table.add_column(col)
    for entry in found:
        r, mine = entry.range, entry.leases
        table.add_row(
            r.name,
            f"{r.first}-{r.last}",
            str(r.block),
            f"{r.threshold:g}",
            (r.bind_text or "-") + (f" ({escape(r.format)})" if r.format else ""),
            "all" if r.stations is None else (", ".join(r.stations) or "none (closed)"),
            str(sum(1 for x in mine if x.left)),
            str(sum(x.left for x in mine)),
        )
    console.print(table)


@range_app.command("show")
def range_show(
    ctx: typer.Context, name: str = typer.Argument(..., help="The range's name.")
) -> None:
    """Every lease of a range: who holds it, used, left, when granted."""
    with open_node(ctx) as node:
        shown = admin.show_range(node, name)
    rdef, held = shown.range, shown.leases
    console.print(
        f"range [bold]{rdef.name}[/] {rdef.first}-{rdef.last}, blocks of {rdef.block}, "
        f"threshold {rdef.threshold:g}, at most {rdef.max_blocks} unused block(s) per station"
        + (f", bound to {rdef.bind_text}" if rdef.bind else "")
        + (f", format {escape(rdef.format)}" if rdef.format else "")
        + (
            f"; never leased yet: {rdef.next_free}-{rdef.last}"
            if rdef.next_free <= rdef.last
            else ""
        )
    )
    table = new_table(show_edge=False)
    for col in ("holder", "block", "used", "left", "state", "granted"):
        table.add_column(col)
    for x in held:
        state = x.state + ("" if x.confirmed else " (not confirmed yet)")
        table.add_row(
            x.holder,
            f"{x.first}-{x.last}",
            str(x.used),
            str(x.left),
            state,
            when(x.granted_at),
        )
    console.print(table if held else "no leases yet")


@range_app.command("set-block")
def range_set_block(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The range's name."),
    block: int = typer.Argument(..., help="Numbers per lease from now on."),
    station: str | None = typer.Option(None, "--station", help="Only for this station."),
) -> None:
    """Change the block size of a range, or of one station's leases."""
    with open_node(ctx) as node:
        admin.set_block(node, name, block, station)
    who = f" for {escape(station)}" if station else ""
    console.print(f"range {escape(name)}: blocks of {block}{who} from the next lease on")


@range_app.command("release")
def range_release(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The range's name."),
    station: str | None = typer.Option(
        None, "--station", help="The station [default: every station, closing the range]."
    ),
) -> None:
    """Ask for the unused numbers of leases back; free once the station confirms."""
    with open_node(ctx) as node:
        count = admin.release_range(node, name, station)
    who = escape(station) if station else "every station (no new blocks are granted)"
    console.print(f"{count} lease(s) of {escape(name)} asked back from {who} with the next sync")


@range_app.command("remove")
def range_remove(
    ctx: typer.Context, name: str = typer.Argument(..., help="The range's name.")
) -> None:
    """Forget a range (refused while a station still holds numbers of it)."""
    with open_node(ctx) as node:
        admin.remove_range(node, name)
    console.print(f"range {escape(name)} removed")


@number_app.command("next")
def number_next(
    ctx: typer.Context, name: str = typer.Argument(..., help="The range's name.")
) -> None:
    """Draw one number from this node's leases and print it."""
    with open_node(ctx) as node:
        number = next_number(node.engine, name)
    print(number)


def register(app: typer.Typer) -> None:
    app.add_typer(range_app, name="range")
    app.add_typer(number_app, name="number")
