"""What the command modules share: the selected config and the consoles.

``rich`` is imported only when something is printed that needs it (a table,
markup, a terminal): an idle ``mailsync sync`` into a log file or a pipe
prints its one plain line without it. Start-up is most of a laptop's small
sync (issue 17, item 4); ``tests/test_cli.py`` pins what a command imports.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import decimal
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from mailsync.config import config_path
from mailsync.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from mailsync.node import Node

#: what rich would read as markup or an emoji code: such text goes through rich
_RICH_SIGNS = ("[", ":")


class LazyConsole:
    """A ``rich`` console made on first real use; plain text bound for a
    file or a pipe is printed without it (the same bytes rich would write:
    no markup, no wrapping, no colour there)."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def rich(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # Into a file or a pipe, rich would assume 80 columns and squeeze
            # the links table to "koe…"; a log file or a mail from cron has room.
            stream = sys.stderr if self._stderr else sys.stdout
            width = None if stream.isatty() or "COLUMNS" in os.environ else 160
            self._console = Console(
                highlight=False, soft_wrap=True, width=width, stderr=self._stderr
            )
        return self._console

    @property
    def is_terminal(self) -> bool:
        if self._console is None and not _forced_terminal():
            return (sys.stderr if self._stderr else sys.stdout).isatty()
        return self.rich.is_terminal

    def print(self, *objects: Any, **options: Any) -> None:
        if (
            self._console is None
            and not options
            and all(isinstance(o, str) and not any(c in o for c in _RICH_SIGNS) for o in objects)
            and not self.is_terminal
        ):
            builtins.print(*objects, file=sys.stderr if self._stderr else sys.stdout)
            return
        self.rich.print(*objects, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rich, name)


def _forced_terminal() -> bool:
    return any(os.environ.get(k) for k in ("FORCE_TERMINAL", "TTY_COMPATIBLE", "FORCE_COLOR"))


console = LazyConsole()


def escape(text: str) -> str:
    """``text`` with rich markup escaped (rich imported only now)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def new_table(*args: Any, **kwargs: Any) -> Table:
    """A rich table (rich imported only now)."""
    from rich.table import Table

    return Table(*args, **kwargs)


@dataclass
class State:
    config: str | None


def open_node(ctx: typer.Context) -> Node:
    from mailsync.node import Node

    state: State = ctx.obj
    return Node.open(config_path(state.config))


def when(value: dt.datetime | None) -> str:
    """A timestamp in local time with its zone, or 'never'."""
    if value is None:
        return "never"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def chosen_ids(ids: list[int] | None, all_: bool, what: str, listed_by: str) -> list[int] | None:
    """IDs named on the command line, or None for ``--all``; neither is an error."""
    if all_:
        return None
    if not ids:
        raise ConfigError(f"name the {what} (IDs from `mailsync {listed_by}`) or pass --all")
    for i in ids:
        if not 0 < i < 2**63:
            raise ConfigError(f"{i} is not an ID of {what} (see `mailsync {listed_by}`)")
    return ids


def grid(*columns: str) -> Table:
    """A borderless table with these column headings."""
    table = new_table(show_edge=False)
    for col in columns:
        table.add_column(col)
    return table


def age(value: dt.datetime | None) -> str:
    """How long ago, shortly: 45s, 12m, 3h, 5d."""
    if value is None:
        return "never"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    seconds = max(0, int((dt.datetime.now(dt.UTC) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()
    if isinstance(value, dt.date | dt.time | dt.timedelta | decimal.Decimal):
        return str(value)  # a Decimal as its exact text
    if isinstance(value, bytes):
        return value.hex()
    return value


def print_json(value: Any) -> None:
    """``--json`` output: dataclasses as objects, times in ISO 8601 (UTC)."""
    print(json.dumps(_plain(value), ensure_ascii=False, indent=2))
