"""Host administration: ``mailsync station ...`` and ``mailsync table ...``."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from mailsync.cli.common import console, escape, new_table, open_node
from mailsync.enroll import Bundle, new_passphrase, passphrase_from, write_bundle
from mailsync.errors import ConfigError
from mailsync.keys import PublicKey
from mailsync.rules import describe_ops, parse_ops
from mailsync.table_requests import check_options

station_app = typer.Typer(help="Define the remote stations (host only).", no_args_is_help=True)
table_app = typer.Typer(
    help="Define which tables sync and which operations travel (host only).",
    no_args_is_help=True,
)

OPS_HELP = "Comma list of insert, update, delete; or all / none."


@station_app.command("add")
def station_add(
    ctx: typer.Context,
    station_id: str | None = typer.Argument(
        None, help="The station's node id, e.g. koeln (not with --csv)."
    ),
    email: str | None = typer.Option(None, "--email", help="The station's mailbox address."),
    label: str = typer.Option("", "--label", help="A name for people, e.g. 'Filiale Köln'."),
    key: str | None = typer.Option(
        None,
        "--key",
        help="The station's public key (msk1:..., printed by its `mailsync init remote`). "
        "Without it, mailsync makes the station's keys and seals them into the bundle.",
    ),
    bundle_path: Path | None = typer.Option(
        None, "--bundle", help="Where to write the enrollment bundle [default: ID.bundle]."
    ),
    passphrase_file: Path | None = typer.Option(
        None,
        "--passphrase-file",
        help="Passphrase for a sealed bundle (else $MAILSYNC_PASSPHRASE, else a new one is made "
        "and printed; with --csv, one per station, listed in DIR-passphrases.csv).",
    ),
    csv_path: Path | None = typer.Option(
        None,
        "--csv",
        help="Add every station of a CSV file (header id,email[,label][,key]), all or none.",
    ),
    bundles: Path | None = typer.Option(
        None, "--bundles", help="With --csv: the folder for the bundles [default: FILE-bundles]."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="With --csv: check the file and the folder, change nothing."
    ),
) -> None:
    """Add a station and write its enrollment bundle for `mailsync join`.

    It gets its rules and an initial load with the next sync. With --csv
    FILE, every station of the file at once (or none, if a row is wrong).
    """
    if csv_path is not None:
        given = [n for n, v in (("ID", station_id), ("--email", email), ("--key", key)) if v]
        given += ["--label"] * bool(label) + ["--bundle"] * (bundle_path is not None)
        if given:
            raise ConfigError(
                f"{given[0]} is for one station; --csv FILE takes every station from the file",
                hint="--bundles DIR says where their bundles go" if bundle_path else None,
            )
        from mailsync.cli.enroll_cmd import add_from_csv

        add_from_csv(ctx, csv_path, bundles, passphrase_file, dry_run)
        return
    if bundles is not None or dry_run:
        raise ConfigError(f"{'--bundles' if bundles else '--dry-run'} goes with --csv FILE")
    if station_id is None or email is None:
        raise ConfigError(
            "give the station's ID and --email (or --csv FILE for many)",
            hint="mailsync station add koeln --email koeln@example.com",
        )
    public = PublicKey.parse(key, "--key") if key else None
    target = bundle_path or Path(f"{station_id}.bundle")
    if target.exists():
        raise ConfigError(f"{target} already exists", hint="remove it or pass --bundle FILE")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        # checked before the station is added: its new keys live only in the bundle
        raise ConfigError(f"{target}: cannot write the bundle into {folder}")
    passphrase = None
    made_up = False
    if public is None:
        passphrase = passphrase_from(passphrase_file)
        if passphrase is None:
            passphrase, made_up = new_passphrase(), True
    written: list[Path] = []

    def keep(bundle: Bundle) -> None:  # before the commit: no station without its keys
        try:
            write_bundle(target, bundle, passphrase)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the bundle {target}: {exc.strerror}; station not added"
            ) from None
        written.append(target)

    with open_node(ctx) as node:
        try:
            station, _ = node.add_station(station_id, email, label, key=public, keep=keep)
        except Exception:
            for path in written:  # the commit failed after the write: a bundle for nobody
                path.unlink(missing_ok=True)
            raise
    console.print(f"station [bold]{escape(station.id)}[/] <{escape(station.email)}> added")
    if public is None:
        console.print(f"bundle {escape(str(target))} holds the station's new private keys, sealed.")
        if made_up:
            console.print(f"passphrase: [bold]{passphrase}[/]")
            console.print("give the passphrase to the station by another channel than the file")
    else:
        console.print(
            f"bundle {escape(str(target))} (public data only; station key {public.key_id})"
        )
    console.print(f"on the station: `mailsync join {escape(target.name)}`")


@station_app.command("list")
def station_list(ctx: typer.Context) -> None:
    """List the stations with their last contact."""
    from mailsync.cli.common import when

    with open_node(ctx) as node:
        stations = node.stations()
        contact = {link.peer: link for link in node.status().links}
    if not stations:
        console.print("no stations yet: `mailsync station add ID --email ADDRESS`")
        return
    table = new_table(show_edge=False)
    for col in ("id", "label", "email", "last contact", "out #", "in #", "state"):
        table.add_column(col)
    for st in stations:
        link = contact.get(st.id)
        paused = link.disabled_since if link else None
        table.add_row(
            st.id,
            st.label,
            st.email,
            when(link.last_contact if link else None),
            str(link.out_seq if link else 0),
            str(link.in_seq if link else 0),
            "enabled" if paused is None else f"disabled since {when(paused)}",
        )
    console.print(table)


@station_app.command("show")
def station_show(
    ctx: typer.Context, station_id: str = typer.Argument(..., help="The station's id.")
) -> None:
    """Show a station and the table rules that govern it."""
    with open_node(ctx) as node:
        station, rules = node.station(station_id)
    console.print(
        f"station [bold]{escape(station.id)}[/] {escape(station.label)} <{escape(station.email)}>"
    )
    _print_rules(list(rules.values()), empty="no table rules apply to this station yet")


@station_app.command("edit")
def station_edit(
    ctx: typer.Context,
    station_id: str = typer.Argument(..., help="The station's id."),
    label: str | None = typer.Option(None, "--label", help="A new label."),
    email: str | None = typer.Option(
        None, "--email", help="A new mailbox address: the station's mail goes there from now on."
    ),
) -> None:
    """Change a station's label or mailbox address."""
    with open_node(ctx) as node:
        station = node.edit_station(station_id, label=label, email=email)
    console.print(
        f"station [bold]{escape(station.id)}[/] {escape(station.label)} <{escape(station.email)}>"
    )


@station_app.command("disable")
def station_disable(
    ctx: typer.Context, station_id: str = typer.Argument(..., help="The station's id.")
) -> None:
    """Pause a station: nothing is sent to it, what it sends is held (not
    refused) and applied once it is enabled; it is told by mail."""
    with open_node(ctx) as node:
        node.disable_station(station_id)
    console.print(
        f"station {escape(station_id)} disabled: nothing goes to it, what it sends is held "
        "(`mailsync station enable` lets it sync again)"
    )


@station_app.command("enable")
def station_enable(
    ctx: typer.Context, station_id: str = typer.Argument(..., help="The station's id.")
) -> None:
    """Let a disabled station sync again (what it sent meanwhile is applied)."""
    with open_node(ctx) as node:
        node.enable_station(station_id)
    console.print(f"station {escape(station_id)} enabled: it syncs again from the next cycle")


@station_app.command("remove")
def station_remove(
    ctx: typer.Context,
    station_id: str = typer.Argument(..., help="The station's id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a station, its own rules and its unsent outbox; it is told by mail."""
    if not yes:
        typer.confirm(f"Remove station {station_id} and everything queued for it?", abort=True)
    with open_node(ctx) as node:
        node.remove_station(station_id)
    console.print(f"station {escape(station_id)} removed")


def _print_rules(rules: list, empty: str) -> None:  # type: ignore[type-arg]
    if not rules:
        console.print(empty)
        return
    table = new_table(show_edge=False)
    for col in ("table", "station", "down (host → remote)", "up (remote → host)", "row filter"):
        table.add_column(col)
    for r in rules:
        table.add_row(
            r.table, r.station, describe_ops(r.down), describe_ops(r.up), r.row_filter or ""
        )
    console.print(table)


@table_app.command("add")
def table_add(
    ctx: typer.Context,
    table: str = typer.Argument(..., help="The table's name in the host database."),
    down: str = typer.Option("all", "--down", help=f"Host → remote operations. {OPS_HELP}"),
    up: str = typer.Option("none", "--up", help=f"Remote → host operations. {OPS_HELP}"),
    station: str | None = typer.Option(
        None, "--station", help="Only for this station (default: all stations)."
    ),
    row_filter: str | None = typer.Option(
        None,
        "--filter",
        help="The station's scope, both ways: one SQL predicate over the table's own columns "
        "(:station is the station's id, :email its address). Changing it sends the station "
        "what entered and removes what left.",
    ),
    conflict: str = typer.Option(
        "host-wins",
        "--conflict",
        help="A row changed on both sides before either heard of the other: "
        "host-wins, remote-wins, newest-wins or manual (the loser is kept: "
        "`mailsync conflicts list`; manual waits for `mailsync conflicts resolve`).",
    ),
    newest_by: str | None = typer.Option(
        None,
        "--newest-by",
        help="newest-wins: the time column compared (default: the capture times, "
        "each node's own clock).",
    ),
) -> None:
    """Sync a table (or change its rule); the capture triggers are installed now."""
    down_ops = parse_ops(down, "--down")
    up_ops = parse_ops(up, "--up")
    with open_node(ctx) as node:
        rule, warnings = node.add_rule(
            table,
            down=down_ops,
            up=up_ops,
            station=station,
            row_filter=row_filter,
            conflict=conflict,
            newest_by=newest_by,
        )
    scope = f"station {rule.station}" if station else "all stations"
    console.print(
        f"table [bold]{escape(table)}[/] ({escape(scope)}): down {describe_ops(rule.down)}, "
        f"up {describe_ops(rule.up)}, conflicts: {rule.conflict}"
        + (f" by {escape(rule.newest_by)}" if rule.newest_by else "")
    )
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


@table_app.command("list")
def table_list(ctx: typer.Context) -> None:
    """List the table rules."""
    with open_node(ctx) as node:
        rules = node.rules()
    _print_rules(rules, empty="no tables sync yet: `mailsync table add TABLE`")


@table_app.command("remove")
def table_remove(
    ctx: typer.Context,
    table: str = typer.Argument(..., help="The table's name."),
    station: str | None = typer.Option(None, "--station", help="Remove only this station's rule."),
) -> None:
    """Stop syncing a table (for all stations, or drop one station's own rule)."""
    with open_node(ctx) as node:
        node.remove_rule(table, station)
    console.print(f"rule for {escape(table)} removed")


@table_app.command("resync")
def table_resync(
    ctx: typer.Context,
    table: str = typer.Argument(..., help="The synced table."),
    station: str | None = typer.Option(
        None, "--station", help="Only this station [default: every station that has it]."
    ),
) -> None:
    """Send a table's definition and rows again (host), after a breaking change.

    A dropped or renamed column, another type or key stops the table for the
    stations that have the old one; fix their table (or take the change
    back), then resync: the stop is lifted and definition and rows go with
    the next sync, replacing the station's copy."""
    with open_node(ctx) as node:
        stations = node.resync_table(table, station)
    where = ", ".join(stations) if stations else "no station has it yet"
    console.print(
        f"{escape(table)}: definition and rows go again with the next sync ({escape(where)})"
    )


def reload(
    ctx: typer.Context,
    station: str | None = typer.Option(
        None, "--station", help="The station to send tables to again (on the host)."
    ),
    table: list[str] = typer.Option(
        [], "--table", help="Only this table (repeatable) [default: every table it gets]."
    ),
    since: str | None = typer.Option(
        None,
        "--since",
        help="Only rows changed since DATE (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC), by the "
        "table's timestamp column.",
    ),
    column: str | None = typer.Option(
        None,
        "--column",
        help="With --since: the timestamp column [default: updated_at, modified_at, … if the "
        "table has one].",
    ),
    full: bool = typer.Option(
        False, "--full", help="In full, replacing the station's copy (the default)."
    ),
) -> None:
    """Send tables to a station again, in full or changed since a date.

    On the host (--station S): with the next sync. In full it replaces the
    station's copy: rows changed, deleted or added there behind mailsync's
    back become the host's again; what the station changed itself and has
    not delivered yet is kept. --since sends only rows changed since DATE
    (deletes are not covered). On a station (no --station): ask the host for
    it; the request goes with the next sync."""
    moment = check_options(since, full)
    if column is not None and moment is None:
        raise ConfigError("--column goes with --since (it names the timestamp column)")
    with open_node(ctx) as node:
        if station is None and node.is_host:
            raise ConfigError("on the host, name the station: --station S")
        if station is None:
            host, tables = node.request_reload(table, since=moment, column=column)
            console.print(
                f"asked host {escape(host)} to send {escape(', '.join(tables) or 'every table')} "
                "again; the request goes with the next sync"
            )
            return
        sent = node.reload_station(station, table, since=moment, column=column)
    how = "in full" if moment is None else f"as far as changed since {moment:%Y-%m-%d %H:%M} UTC"
    console.print(
        f"{escape(', '.join(sent))}: sent again {how} to {escape(station)} with the next sync"
    )
