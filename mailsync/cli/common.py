"""What the command modules share: the selected config and the consoles."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import typer
from rich.console import Console

from mailsync.config import config_path
from mailsync.node import Node

console = Console(highlight=False, soft_wrap=True)


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
