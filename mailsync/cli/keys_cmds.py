"""``mailsync join``, ``keys show|rotate`` and ``inspect``."""

from __future__ import annotations

from pathlib import Path

import typer

from mailsync.cli.common import console, escape, new_table, open_node
from mailsync.enroll import passphrase_from, read_bundle
from mailsync.errors import ConfigError

keys_app = typer.Typer(help="This node's keys.", no_args_is_help=True)


def join(
    ctx: typer.Context,
    bundle_path: Path = typer.Argument(..., help="The bundle `mailsync station add` wrote."),
    passphrase_file: Path | None = typer.Option(
        None,
        "--passphrase-file",
        help="Passphrase of a sealed bundle (else $MAILSYNC_PASSPHRASE, else asked).",
    ),
) -> None:
    """Join the host named in an enrollment bundle (on a remote station)."""

    def passphrase() -> str:
        given = passphrase_from(passphrase_file)
        if given is not None:
            return given
        if not console.is_terminal:
            raise ConfigError(
                f"{bundle_path} is sealed: give its passphrase with --passphrase-file "
                "or $MAILSYNC_PASSPHRASE"
            )
        return str(typer.prompt("bundle passphrase", hide_input=True))

    bundle = read_bundle(bundle_path, passphrase)
    with open_node(ctx) as node:
        node.join(bundle)
        mine = node.public_key.key_id
    console.print(
        f"joined host [bold]{escape(bundle.host_id)}[/] <{escape(bundle.host_address)}>, "
        f"host key {bundle.host_key.key_id}; this station's key {mine}"
        + (" (from the bundle)" if bundle.station_keys else "")
    )
    console.print("compare the key ids with the host's admin; then `mailsync sync`")


@keys_app.command("show")
def keys_show(ctx: typer.Context) -> None:
    """Print this node's public key and key id (safe to share)."""
    with open_node(ctx) as node:
        public = node.public_key
    console.print(f"key id {public.key_id}")
    console.print(public.token())


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context) -> None:
    """Make new keys; peers learn them with the next sync (signed with the old key)."""
    with open_node(ctx) as node:
        public = node.rotate_keys()
        grace = node.config.key_grace_days
    console.print(f"new key id {public.key_id}; the old key still opens mail for {grace} days")
    console.print("run `mailsync sync` so that every peer learns the new key")


def inspect(
    ctx: typer.Context,
    message: Path = typer.Argument(..., help="A message file (.eml, or one from a Maildir)."),
) -> None:
    """Show what a message carries: link, sequence, tables, rows per operation, sizes."""
    from mailsync.tools.inspection import inspect_message

    try:
        raw = message.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {message}: {exc.strerror}") from exc
    with open_node(ctx) as node:
        report = inspect_message(node, raw, str(message))
    h = report.header
    console.print(
        f"{escape(h.sender)} → {escape(h.recipient)}  #{h.seq}  part {h.part}/{h.parts}  "
        f"ack {h.ack}  envelope v{h.version}  sealed for key {h.key_id}"
    )
    console.print(f"signature: {escape(report.verified)}")
    console.print(f"opened: {escape(report.opened)}")
    console.print(
        f"sizes: message {report.message_size:,} bytes, envelope {report.envelope_size:,}"
        + (
            f", changeset {report.raw_size:,} raw (compression ×{report.ratio:.1f})"
            if report.raw_size
            else ""
        )
    )
    if report.controls:
        console.print(f"control: {', '.join(report.controls)}")
    if report.summary.per_table:
        table = new_table(show_edge=False)
        for col in ("table", "insert", "update", "delete"):
            table.add_column(col, justify="left" if col == "table" else "right")
        for name, ops in report.summary.per_table.items():
            table.add_row(name, str(ops["I"]), str(ops["U"]), str(ops["D"]))
        console.print(table)
    if report.verified != "yes" or not report.opened.startswith("yes"):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(join)
    app.add_typer(keys_app, name="keys")
    app.command()(inspect)
    app.add_typer(mailbox_app, name="mailbox")


mailbox_app = typer.Typer(help="This node's mailbox accounts.", no_args_is_help=True)


@mailbox_app.command("test")
def mailbox_test(
    ctx: typer.Context,
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for the test message."),
) -> None:
    """Check the node's accounts: login, folders, and a message sent to itself."""
    from mailsync.tools.mailcheck import check_mailbox

    with open_node(ctx) as node:
        results = check_mailbox(node, wait_s=wait)
    for check in results:
        mark = "[green]ok[/]  " if check.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {check.step}: {escape(check.detail)}")
    if not all(c.ok for c in results) or len(results) < 4:
        raise typer.Exit(4)
