"""``mailsync demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from mailsync.cli.common import console, escape, new_table


def demo(
    directory: Path = typer.Argument(
        Path("mailsync-demo"), help="Folder for the demo nodes (new, empty, or an old demo)."
    ),
) -> None:
    """Run a host and two stations on the sample data, over local mailboxes."""
    from mailsync.tools.demo import run_demo  # the sample data is only needed here

    result = run_demo(directory, lambda line: console.print(escape(line)))
    nodes = list(result.checksums)
    table = new_table(title="after sync: rows and content checksum per node", show_edge=False)
    table.add_column("table", no_wrap=True)
    table.add_column("rows", justify="right", no_wrap=True)
    for node in nodes:
        table.add_column(f"checksum {node}", no_wrap=True)
    table.add_column("agree", no_wrap=True)
    for name in result.checksums[nodes[0]]:
        cells = [result.checksums[n][name] for n in nodes]
        same = all(c == cells[0] for c in cells)
        counts = {c.rows for c in cells}
        table.add_row(
            name,
            str(cells[0].rows) if len(counts) == 1 else " / ".join(str(c.rows) for c in cells),
            *[c.digest[:12] for c in cells],
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
