"""``mailsync serve``, ``schedule`` and ``log``."""

from __future__ import annotations

import datetime as dt
import re
import threading
from pathlib import Path

import typer

from mailsync.cli.common import State, console, escape, new_table, open_node, print_json
from mailsync.config import config_path, load_config
from mailsync.errors import ConfigError
from mailsync.journal import LEVELS, read_log
from mailsync.schedule import Schedule, next_runs, parse_schedule, parse_zone
from mailsync.store.tables import now

_AGO = re.compile(r"^(\d+)\s*(m|h|d)$")


def serve(
    ctx: typer.Context,
    configs: list[Path] = typer.Option(
        [],
        "--config",
        "-c",
        help="A node's config file; repeat to serve several nodes (one per company "
        "database) [default: the global --config].",
    ),
    once: bool = typer.Option(
        False, "--once", help="One cycle of each node now, then exit (for cron or a timer)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="Serve a PostgreSQL host with N worker processes that share out the stations; "
        "other machines may run theirs against the same database.",
    ),
) -> None:
    """Sync on the node's schedule until stopped (SIGTERM/SIGINT finish the cycle first)."""
    state: State = ctx.obj
    paths = configs or [config_path(state.config)]
    stop = threading.Event()
    from mailsync.service import serve as run_service
    from mailsync.service import stop_on_signals

    stop_on_signals(stop, console.print)
    if workers is not None:
        if len(paths) != 1:
            raise ConfigError("--workers serves one node: give one --config")
        from mailsync.workers.pool import serve_workers

        failed = serve_workers(paths[0], workers, once=once, say=console.print, stop=stop)
    else:
        failed = run_service(paths, once=once, say=console.print, stop=stop)
    if once and failed:
        raise typer.Exit(5)


def schedule(
    ctx: typer.Context,
    every: str | None = typer.Option(None, "--every", help="Try a schedule: e.g. 15m, 2h."),
    between: str | None = typer.Option(None, "--between", help="e.g. 06:00-23:00."),
    days: str | None = typer.Option(None, "--days", help="e.g. mon-fri, mon,wed,sat, all."),
    count: int = typer.Option(5, "--count", help="How many runs to show."),
) -> None:
    """The next run times of the node's schedule (or of the one given), in local time."""
    state: State = ctx.obj
    path = config_path(state.config)
    where = "--every/--between/--days"
    schedules: tuple[Schedule, ...]
    if (between is not None or days is not None) and every is None:
        raise ConfigError(f"{where}: --between and --days need --every")
    # a schedule tried on the command line needs no node: the config, when
    # there is one, gives only its time zone
    config = load_config(path) if every is None or path.exists() else None
    if every is not None:
        schedules = (parse_schedule(every, between, days, where=where),)
    else:
        assert config is not None
        schedules = config.schedules
    if not schedules:
        console.print(
            "no schedule: add "
            + escape("[[schedule]]")
            + " to the config (or try one with --every 15m)"
        )
        raise typer.Exit(1)
    zone = parse_zone(config.timezone, str(config.path)) if config else parse_zone(None, "")
    for item in schedules:
        console.print(f"schedule: {item.describe()}")
    runs = next_runs(schedules, now(), zone, count)
    if not runs:
        console.print("no run in the next two years")
    for run in runs:
        console.print(f"  {run:%a %Y-%m-%d %H:%M:%S %Z}")


def _since(text: str) -> dt.datetime:
    match = _AGO.match(text.strip())
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now() - dt.timedelta(**{unit: int(match.group(1))})
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give an age like 30m, 2h, 3d or a time like 2026-11-20 08:00"
        ) from None
    # a time without zone is local; the log stores UTC
    return (value if value.tzinfo is not None else value.astimezone()).astimezone(dt.UTC)


def log(
    ctx: typer.Context,
    since: str | None = typer.Option(None, "--since", help="e.g. 2h, 3d or 2026-11-20."),
    peer: str | None = typer.Option(None, "--peer", help="Only entries about this peer."),
    level: str = typer.Option("info", "--level", help="debug, info, warning or error."),
    limit: int = typer.Option(200, "--limit", help="The newest this many entries."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The node's log: cycles, messages, conflicts, range grants, errors."""
    if level not in LEVELS:
        raise ConfigError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
    with open_node(ctx) as node:
        entries = read_log(
            node.engine,
            since=_since(since) if since else None,
            peer=peer,
            level=level,
            limit=limit,
        )
    if as_json:
        print_json(entries)
        return
    colours = {"error": "bold red", "warning": "yellow", "info": "", "debug": "dim"}
    table = new_table(show_edge=False, show_header=False, box=None)
    for entry in entries:
        style = colours[entry.level]
        table.add_row(
            f"{entry.at.astimezone():%Y-%m-%d %H:%M:%S %Z}",
            entry.level,
            entry.peer or "",
            escape(entry.message),
            style=style or None,
        )
    console.print(table if entries else "nothing logged")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(schedule)
    app.command()(log)
