"""``mailsync init``, ``sync`` and ``status``."""

from __future__ import annotations

import datetime as dt
import sys
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from mailsync.cli.common import State, age, console, escape, new_table, open_node, print_json, when
from mailsync.cli.init_questions import ask_mailbox, interactive
from mailsync.cli.progress_view import with_progress
from mailsync.config import config_path
from mailsync.keys import key_path, load_keyring
from mailsync.node import init_node
from mailsync.schedule import next_runs, parse_zone
from mailsync.store.tables import now

if TYPE_CHECKING:
    from mailsync.service import ServiceState
    from mailsync.verification import Verification
    from mailsync.workers.registry import WorkerRow


class RoleChoice(StrEnum):
    host = "host"
    remote = "remote"


def init(
    ctx: typer.Context,
    role: RoleChoice = typer.Argument(..., help="host (headquarters) or remote (a station)."),
    node_id: str = typer.Option(..., "--id", help="This node's id, e.g. hq or koeln."),
    db: str = typer.Option(
        ..., "--db", help="Application database (SQLAlchemy URL), e.g. sqlite:///shop.db."
    ),
    address: str = typer.Option(..., "--address", help="This node's e-mail address."),
    mail: str | None = typer.Option(
        None,
        "--mail",
        help="Mailbox URL for sending and receiving; maildir:PATH is a local post office "
        "\\[default: asked on a terminal, else maildir:mail].",
    ),
    send: str | None = typer.Option(
        None, "--send", help="Where mail is sent, e.g. smtp+starttls://USER@HOST:587 [--mail]."
    ),
    receive: str | None = typer.Option(
        None, "--receive", help="Where mail is read, e.g. imaps://USER@HOST [--mail]."
    ),
    password_env: str | None = typer.Option(
        None, "--password-env", help="The environment variable with the mailbox password."
    ),
    password_file: str | None = typer.Option(
        None, "--password-file", help="The file with the mailbox password (mode 0600)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config file."),
) -> None:
    """Create a node: write its config and the mailsync tables in its database."""
    state: State = ctx.obj
    path = config_path(state.config)
    if mail is None and send is None and receive is None and interactive():
        asked = ask_mailbox(address, path.parent)
        send, receive = asked.send, asked.receive
        password_env = password_env or asked.password_env
        password_file = password_file or asked.password_file
    cfg = init_node(
        path,
        role=role.value,
        node_id=node_id,
        database=db,
        address=address,
        mail=mail or "maildir:mail",
        force=force,
        send=send,
        receive=receive,
        password_env=password_env,
        password_file=password_file,
    )
    public = load_keyring(key_path(path), cfg.node_id).current.public
    console.print(
        f"{cfg.role} [bold]{escape(cfg.node_id)}[/] created: config {escape(str(path))}, "
        f"keys {escape(str(key_path(path)))} (0600)"
    )
    console.print(f"public key (id {public.key_id}):")
    console.print(public.token())
    if cfg.role == "host":
        console.print("next: `mailsync station add ...` and `mailsync table add ...`")
    else:
        console.print(
            f"next: the host's admin runs `mailsync station add {escape(cfg.node_id)} "
            f"--email {escape(cfg.mailbox.address)} --key <the key above>` and gives you "
            "the bundle it writes; then `mailsync join BUNDLE` and `mailsync sync` here"
        )


def sync(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    station: list[str] = typer.Option(
        [], "--station", help="Host: only this station's link this run (repeatable)."
    ),
    table: list[str] = typer.Option(
        [], "--table", help="Only this table's changes this run (repeatable); the rest wait."
    ),
) -> None:
    """Run one sync cycle: receive, apply, capture, send (or limit it to
    some stations and tables: what is left out waits, nothing is lost)."""
    with open_node(ctx) as node:
        try:
            report = (
                with_progress(node, station, table)
                if console.is_terminal and not as_json
                else node.sync(station, table)
            )
        except Exception:
            node.remember_cycle(False)
            raise
        node.remember_cycle(not report.errors)
    if as_json:
        print_json(
            {
                "received": report.received,
                "duplicates": report.duplicates,
                "set_aside": report.set_aside,
                "changesets_applied": len(report.applied),
                "rows_applied": report.rows_applied,
                "rows_parked": report.rows_parked,
                "changesets_queued": len(report.built),
                "parts_queued": sum(b.parts for b in report.built),
                "rows_queued": report.rows_sent,
                "sent": report.sent,
                "errors": report.errors,
            }
        )
        if report.errors:
            raise typer.Exit(report.exit_code)
        return
    console.print(
        f"received {report.received} message(s)"
        + (f" ({report.duplicates} duplicate)" if report.duplicates else "")
        + f", applied {len(report.applied)} changeset(s) / {report.rows_applied} row(s), "
        f"queued {len(report.built)} changeset(s) / {report.rows_sent} row(s), "
        f"sent {report.sent} message(s)"
    )
    if report.set_aside:
        console.print(f"[yellow]{report.set_aside} message(s) set aside as unrecognized[/]")
    if report.rows_parked:
        console.print(
            f"[bold red]{report.rows_parked} row(s) could not be applied and are parked[/] "
            "(`mailsync errors list`)"
        )
    for error in report.errors:
        console.print(f"[bold red]error:[/] {escape(error)}")
    if report.errors:
        raise typer.Exit(report.exit_code)


class StatusFormat(StrEnum):
    text = "text"
    json = "json"
    openmetrics = "openmetrics"


def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    fmt: StatusFormat = typer.Option(
        StatusFormat.text,
        "--format",
        help="text, json (= --json), or openmetrics (for the node exporter's textfile collector).",
    ),
) -> None:
    """Show role, peers, last contact, pending changes, outbox and problems."""
    with open_node(ctx) as node:
        st = node.status()
        from mailsync.service import service_state  # the service's machinery: only here

        service = service_state(node)
        from mailsync.workers.registry import listing

        workers = listing(node.engine)
        zone = parse_zone(node.config.timezone, str(node.config.path))
        upcoming = next_runs(node.config.schedules, now(), zone, 1)
        retention = node.config.log_retention_days
        if fmt is StatusFormat.openmetrics:
            from mailsync.metrics import openmetrics, read_extra

            text = openmetrics(
                st,
                read_extra(node.engine),
                service_running=service.running,
                service_crashed=service.crashed,
            )
    if fmt is StatusFormat.openmetrics:
        sys.stdout.write(text)
        return
    if as_json or fmt is StatusFormat.json:
        print_json({"node": st, "service": service, "workers": workers})
        return
    console.print(
        f"[bold]{escape(st.node_id)}[/] ({st.role}) <{escape(st.address)}>  "
        f"database {escape(st.database)}  key {st.key_id}"
    )
    console.print(f"tables synced: {', '.join(st.tables) or 'none yet'}")
    console.print("service: " + _service_line(service, upcoming))
    if workers:
        _print_workers(workers)
    for peer, line in service.last_peers.items():
        colour = "red" if line.startswith("failed") else "green"
        console.print(f"  with {escape(peer)}: [{colour}]{escape(line)}[/]")
    table = new_table(title="links" if st.links else None, show_edge=False)
    numeric = ("out #", "acked #", "in #", "pending", "outbox", "unacked", "buffered")
    for col in ("peer", "address", "last contact", "last sent", *numeric, "missing"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for link in st.links:
        table.add_row(
            link.peer,
            link.address,
            when(link.last_contact),
            when(link.last_sent),
            str(link.out_seq),
            str(link.acked_seq),
            str(link.in_seq),
            str(link.pending_changes),
            str(link.unsent),
            str(link.unacked) + (f" ({age(link.oldest_unacked)} old)" if link.unacked else ""),
            str(link.buffered),
            _missing(link.missing, link.missing_parts),
        )
    if st.links:
        console.print(table)
        for link in st.links:
            if link.restore:
                console.print(f"[bold yellow]{escape(link.restore)}[/]")
            if link.held:
                console.print(
                    f"[bold red]changesets from {escape(link.peer)} held[/] since "
                    f"{when(link.held_since)}: {escape(link.held)}"
                )
            if link.quarantined:
                console.print(
                    f"[bold red]{link.quarantined} changeset(s) from {escape(link.peer)} "
                    f"quarantined[/] (`mailsync inbox list {escape(link.peer)}`)"
                )
            for t in link.tables:  # a table's definition: the host says what is not current
                if st.role == "host" and t.state == "current":
                    continue
                colour = "red" if t.state.startswith("stopped") else "default"
                console.print(
                    f"  table {escape(t.table)} with {escape(link.peer)}: definition "
                    f"{t.version or '(not known yet)'} [{colour}]{escape(t.state)}[/]"
                )
    else:
        console.print(
            "no peers yet: "
            + ("add stations" if st.role == "host" else "join the host with `mailsync join BUNDLE`")
        )
    for link in st.links:
        if link.disabled_since is not None:
            console.print(
                f"[bold yellow]station {escape(link.peer)} disabled[/] since "
                f"{when(link.disabled_since)}: nothing goes to it; {link.buffered} "
                "changeset(s) of its held (`mailsync station enable`)"
            )
    if st.standing:
        console.print(f"[bold red]{escape(st.standing)}[/]")
    if st.reload_asked:
        console.print(f"reload: {escape(st.reload_asked)} (waiting for its answer)")
    for use in st.ranges:
        current = use.current
        if current is None and st.role == "host":
            line = "no block of its own yet (leased itself at the first draw)"
        elif current is None:
            line = (
                f"[bold red]none left[/] (asked at {when(use.asked_at)})"
                if use.asked_at
                else ("[bold red]none left[/]")
            )
        else:
            line = (
                f"block {current.first}-{current.last}: {current.used} used, {current.left} left; "
                + ("next block held" if use.next_held else "next block not held yet")
            )
        console.print(f"range {escape(use.name)}: {line}")
    if st.capture_missing:
        console.print(
            f"[bold red]capture triggers missing or altered:[/] {', '.join(st.capture_missing)}"
            " (the next sync reinstalls them)"
        )
    if st.restored:
        console.print(f"[bold yellow]restore:[/] {escape(st.restored)}")
    if st.set_aside:
        console.print(f"[yellow]{st.set_aside} message(s) set aside as unrecognized[/] (see log)")
    if st.errors:
        console.print(f"[bold red]{st.errors} changeset(s) failed to apply[/] (see log)")
    if st.refused:
        console.print(
            f"[bold yellow]rows refused by the rules in {st.refused} changeset report(s)[/] "
            f"in the last {retention} day(s): nothing of them was "
            "written (`mailsync log`)"
        )
    if st.replayed:
        console.print(
            f"[yellow]{st.replayed} control message(s) ignored as replayed or late[/] "
            f"in the last {retention} day(s): not newer than the last acted on "
            "(`mailsync log`)"
        )
    if st.blocks_refused:
        console.print(
            f"[yellow]{st.blocks_refused} request(s) for a number block refused[/] "
            f"in the last {retention} day(s): the station held its cap of unused blocks "
            "(`mailsync log`)"
        )
    if st.conflicts:
        console.print(
            f"[yellow]{st.conflicts} conflict(s) recorded[/]: rows changed here and at a peer "
            "at once; the losing versions are kept (`mailsync conflicts list`)"
        )
    if st.conflicts_waiting:
        console.print(
            f"[bold yellow]{st.conflicts_waiting} conflict(s) waiting for a decision[/] "
            "(manual policy): `mailsync conflicts list --waiting`, then on the host "
            "`mailsync conflicts resolve ID --keep host|station`"
        )
    if st.overwritten:
        console.print(
            f"[yellow]{st.overwritten} local edit(s) overwritten[/] in the last "
            f"{retention} day(s): the rules do not send them, a peer's version replaced "
            "them (`mailsync log`)"
        )
    for v in st.verifications:
        console.print(_verified(v))
    if st.parked:
        console.print(
            f"[bold red]{st.parked} row(s) could not be applied and are parked[/]: "
            "`mailsync errors list`, then `errors retry` or `errors drop`"
        )


def _verified(v: Verification) -> str:
    """One line per station and table: its last verification."""
    head = f"verify {escape(v.station)} {escape(v.table)} #{v.id} ({when(v.started_at)}): "
    found = f"{v.rows_compared:,} rows equal, {v.differing} differ"
    if v.state == "failed":
        return head + f"[bold red]failed[/]: {escape(v.error or '')}"
    if not v.finished:
        return head + f"{v.state}, round {v.rounds} (waiting for the mail)"
    colour = "green" if v.differing == 0 else "bold yellow"
    return head + f"[{colour}]{v.state}[/] {when(v.finished_at)}: {found}"


def _missing(seqs: tuple[int, ...], parts: tuple[tuple[int, int], ...]) -> str:
    shown = [f"#{s}" for s in seqs] + [f"#{s} part {p}" for s, p in parts]
    return ", ".join(shown[:10]) + (" …" if len(shown) > 10 else "")


def _print_workers(workers: list[WorkerRow]) -> None:
    """``serve --workers``: the workers alive, and those gone within a day."""
    alive = sum(w.alive for w in workers)
    console.print(f"workers: {alive} alive (serve --workers)")
    table = new_table(show_edge=False)
    for col in ("worker", "machine", "pid", "state", "since", "heartbeat", "links", "cycles"):
        table.add_column(
            col, justify="right" if col in ("worker", "pid", "links", "cycles") else "left"
        )
    table.add_column("last cycle")
    for w in workers:
        state = (
            "[green]alive[/]"
            if w.alive
            else ("stopped" if w.stopped_at is not None else "[red]gone[/] (died or killed)")
        )
        if w.alive and w.coordinated_at is not None and w.coordinated_at == w.last_cycle_at:
            state += ", read the mailbox"
        table.add_row(
            str(w.id),
            escape(w.host),
            str(w.pid),
            state,
            when(w.started_at),
            when(w.heartbeat_at),
            str(w.links),
            str(w.cycles),
            escape(w.last_outcome or "none yet"),
        )
    console.print(table)


def _service_line(service: ServiceState, upcoming: list[dt.datetime]) -> str:
    if not service.configured:
        head = f"not configured (no {escape('[[schedule]]')}; sync by hand or from cron)"
    elif service.running:
        head = (
            f"[green]running[/] since {when(service.started_at)} on {escape(service.host or '')} "
            f"(pid {service.pid})"
        )
        if service.next_run_at is not None:
            head += f", next sync at {service.next_run_at.astimezone():%H:%M %Z}"
    elif service.crashed:
        head = (
            f"[bold red]stopped unexpectedly[/]: the serve on {escape(service.host or '')} "
            f"(pid {service.pid}, running since {when(service.started_at)}) is gone without "
            f"stopping; its last heartbeat was {when(service.heartbeat_at)} (see the system "
            "log: killed, crashed or its machine went down)"
        )
    else:
        head = "[yellow]stopped[/]" + (
            f" since {when(service.stopped_at)}" if service.stopped_at else ""
        )
        if upcoming:
            head += f" (the schedule's next run would be {upcoming[0]:%a %H:%M %Z})"
    if service.last_cycle_at is not None:
        head += f"; last cycle {when(service.last_cycle_at)}: {escape(service.last_outcome or '')}"
    return head


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(sync)
    app.command()(status)
