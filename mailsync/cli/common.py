"""What the command modules share: the selected config and the consoles."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mailsync.config import config_path
from mailsync.errors import ConfigError
from mailsync.node import Node

# Into a file or a pipe, rich would assume 80 columns and squeeze the links
# table to "koe…"; a log file or a mail from cron has room.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)


@dataclass
class State:
    config: str | None


def open_node(ctx: typer.Context) -> Node:
    state: State = ctx.obj
    return Node.open(config_path(state.config))


def when(value: dt.datetime | None) -> str:
    """A timestamp in local time, or 'never'."""
    if value is None:
        return "never"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


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
    table = Table(show_edge=False)
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
    if isinstance(value, dt.date | dt.time | dt.timedelta):
        return str(value)
    return value


def print_json(value: Any) -> None:
    """``--json`` output: dataclasses as objects, times in ISO 8601 (UTC)."""
    print(json.dumps(_plain(value), ensure_ascii=False, indent=2))
