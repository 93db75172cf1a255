"""The ``mailsync`` command: arguments in, library calls, results out.

Each command module turns options into one call of the library and prints
the result; :func:`main` turns a :class:`~mailsync.errors.MailsyncError` into
a one-line message, a hint and a non-zero exit code — never a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys

import typer

from mailsync.cli import (
    admin,
    alerts_cmds,
    conflicts_cmds,
    demo_cmd,
    errors_cmds,
    inbox_cmds,
    keys_cmds,
    node_cmds,
    range_cmds,
    service_cmds,
    verify_cmd,
)
from mailsync.cli.common import LazyConsole, State, escape
from mailsync.errors import INTERRUPTED, MailsyncError

app = typer.Typer(
    name="mailsync",
    help="Keep database tables in step between a host and its stations, by e-mail.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # never print a password from a local
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        envvar="MAILSYNC_CONFIG",
        help="The node's config file \\[default: ./mailsync.toml].",
        show_envvar=True,
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step to stderr."),
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=lambda shown: _print_version() if shown else None,
        help="Print the installed version and exit.",
    ),
) -> None:
    """mailsync: store-and-forward database sync over ordinary mailboxes."""
    ctx.obj = State(config=config)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _print_version() -> None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        print(f"mailsync {installed('mailsync')}")
    except PackageNotFoundError:  # run from a checkout that was never installed
        print("mailsync (not installed: run from a source tree)")
    raise typer.Exit()


node_cmds.register(app)
service_cmds.register(app)
app.add_typer(admin.station_app, name="station")
app.add_typer(admin.table_app, name="table")
app.command("reload")(admin.reload)
range_cmds.register(app)
keys_cmds.register(app)
errors_cmds.register(app)
inbox_cmds.register(app)
conflicts_cmds.register(app)
demo_cmd.register(app)
verify_cmd.register(app)
alerts_cmds.register(app)


class _Interrupted(BaseException):
    """A Ctrl-C, raised past click (which would print "Aborted!" for a
    KeyboardInterrupt) to :func:`main`."""


def _on_interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def main() -> None:
    """Console-script entry point: one line for every failure a user causes
    or meets, never a traceback; a Ctrl-C says that nothing is lost (every
    step commits before the next relies on it). ``serve`` installs its own
    SIGINT handler: it finishes the cycle in progress."""
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        app()
    except MailsyncError as exc:
        err = LazyConsole(stderr=True)
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if exc.hint:
            err.print(f"[yellow]hint:[/] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except (_Interrupted, KeyboardInterrupt):
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
