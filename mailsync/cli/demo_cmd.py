"""``mailsync demo``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mailsync.cli.common import console


def demo(
    directory: Path = typer.Argument(
        Path("mailsync-demo"), help="Folder for the demo nodes (new, empty, or an old demo)."
    ),
) -> None:
    """Run a host and two stations on the sample data, over local mailboxes."""
    from mailsync.demo import run_demo  # the sample data is only needed here

    result = run_demo(directory, lambda line: console.print(escape(line)))
    table = Table(title="after sync: rows / checksum per node", show_edge=False)
    table.add_column("table")
    nodes = list(result.checksums)
    for node in nodes:
        table.add_column(node)
    table.add_column("agree")
    for name in result.checksums[nodes[0]]:
        cells = [result.checksums[n][name] for n in nodes]
        same = all(c == cells[0] for c in cells)
        table.add_row(
            name,
            *[f"{c.rows} / {c.digest}" for c in cells],
            "[green]yes[/]" if same else "[bold red]NO[/]",
        )
    console.print(table)
    if not result.agree:
        console.print("[bold red]the nodes do not agree[/]")
        raise typer.Exit(1)
    console.print(
        "all three databases agree. Nodes, databases and mailboxes: "
        f"{escape(str(result.directory))}"
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
