"""Start-up: a command imports only what it needs (issue 17, item 4).

Pinned by what a process has imported, never by timing: an idle ``mailsync
sync`` into a pipe (as cron or a service runs it) needs the engine, the
database and the keys, but not ``rich`` (nothing to draw), not the mail
libraries of transports it does not use (``aiosmtplib``, ``imapclient``,
``poplib``, ``smtplib``), not ``mailsync serve``'s machinery, not the tools
only the CLI's other commands use, not the modern ``email.policy`` API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cluster import Cluster, customers

#: never imported by an idle `mailsync sync` over Maildir
NOT_FOR_SYNC = (
    "rich",
    "aiosmtplib",
    "imapclient",
    "poplib",
    "smtplib",
    "imaplib",
    "email.policy",
    "mailsync.tools",
    "mailsync.service",
    "mailsync.transport.smtp",
    "mailsync.transport.imap",
    "mailsync.transport.pop3",
)

_DUMP = textwrap.dedent(
    """
    import atexit, json, runpy, sys
    out = sys.argv[1]
    atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
    {body}
    """
)


def modules_after(body: str, out: Path, *args: str, cwd: Path | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running ``body``."""
    proc = subprocess.run(
        [sys.executable, "-c", _DUMP.format(body=body), str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return set(json.loads(out.read_text()))


def loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_importing_the_package_or_the_cli_imports_no_extras(tmp_path: Path) -> None:
    bare = modules_after("import mailsync", tmp_path / "bare.json")
    assert "mailsync" in bare
    assert not loaded(bare, "sqlalchemy") and "mailsync.node" not in bare
    errors = modules_after("from mailsync import MailsyncError", tmp_path / "errors.json")
    assert "mailsync.errors" in errors and "mailsync.node" not in errors
    cli = modules_after("import mailsync.cli", tmp_path / "cli.json")
    assert "mailsync.cli" in cli
    for name in NOT_FOR_SYNC:
        assert not loaded(cli, name), f"`import mailsync.cli` imported {name}"


@pytest.mark.parametrize("node", ["koeln", "hq"])
def test_an_idle_sync_imports_only_what_it_needs(tmp_path: Path, node: str) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        c.execute("hq", customers.insert(), {"id": 1, "name": "eins"})
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.sync("hq", "koeln", "hq", "koeln")  # idle from here
    finally:
        c.close()
    config = str(tmp_path / node / "mailsync.toml")
    body = (
        "sys.argv = ['mailsync', *sys.argv[2:]]\n"
        "try:\n"
        "    runpy.run_module('mailsync', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
    )
    mods = modules_after(body, tmp_path / "sync.json", "-c", config, "sync", cwd=tmp_path)
    assert "mailsync.cycle.run" in mods and loaded(mods, "sqlalchemy")  # it did sync
    for name in NOT_FOR_SYNC:
        assert not loaded(mods, name), f"an idle `mailsync sync` imported {name}"


def test_the_command_pins_the_allocators_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``mailsync`` process keeps a load's megabyte buffers in ``mmap``
    (:mod:`mailsync.allocator`): on Linux with glibc the pin takes; the
    command's entry point asks for it before anything else."""
    from mailsync import allocator, entry

    if sys.platform.startswith("linux"):
        assert allocator.pin_mmap_threshold()
    asked: list[bool] = []
    monkeypatch.setattr(allocator, "pin_mmap_threshold", lambda: asked.append(True) or True)
    monkeypatch.setattr(sys, "argv", ["mailsync", "--version"])
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code in (0, None)
    assert asked == [True]
