"""``mailsync alerts test``: does an alert reach the admin?"""

from __future__ import annotations

import typer

from mailsync.cli.common import console, escape, open_node
from mailsync.errors import TransportError
from mailsync.transport import scheme_of

alerts_app = typer.Typer(
    help="Mail to a person when something needs one ([alerts] in the config).",
    no_args_is_help=True,
)


@alerts_app.command("test")
def alerts_test(ctx: typer.Context) -> None:
    """Send a test alert to the [alerts] addresses, through the node's own send account."""
    with open_node(ctx) as node:
        sent = node.test_alerts()
        box = node.config.mailbox
    console.print(
        f"test alert sent to {escape(', '.join(sent))} from {escape(box.address)} "
        f"through {escape(box.send)}"
    )
    if len(sent) < len(node.config.alerts.to):
        missed = [a for a in node.config.alerts.to if a not in sent]
        console.print(f"[bold red]not sent to:[/] {escape(', '.join(missed))} (see the log)")
        raise typer.Exit(TransportError.exit_code)
    if scheme_of(box.send) in ("maildir", "memory"):
        console.print(
            "note: the send account is a local post office: the alert is in its folder "
            "for that address, not in a real mailbox"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
