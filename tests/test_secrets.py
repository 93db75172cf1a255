"""Files and secrets: what mailsync writes is owner-only, a ``+starttls``
mailbox without STARTTLS fails closed, and ``insecure = true`` is never quiet.

The servers that offer no STARTTLS are the tiny fakes of tests/servers/fake.py
on 127.0.0.1; everything of mailsync's own runs for real.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from mailsync.enroll import Bundle, write_bundle
from mailsync.errors import TransportError
from mailsync.journal import read_log
from mailsync.keys import KeyPair
from mailsync.node import init_node
from mailsync.spools import PartSpool
from mailsync.store.engine import open_engine
from mailsync.transport import TransportContext, open_receiver, open_sender
from mailsync.transport.maildir import deliver
from tests.cluster import DOMAIN, Cluster
from tests.servers.fake import plain_server
from tests.test_cli import mailsync


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_database_mailsync_creates_is_owner_only_and_so_are_its_journal_files(
    tmp_path: Path,
) -> None:
    db = tmp_path / "new.db"
    engine = open_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            # mailsync's own settings (README, How it works): WAL, every commit synced
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            made = [db, tmp_path / "new.db-wal", tmp_path / "new.db-shm"]  # while it is open
            assert {p.name: mode(p) for p in made} == {p.name: 0o600 for p in made}
    finally:
        engine.dispose()
    assert mode(db) == 0o600


def test_an_application_database_that_exists_keeps_its_mode(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    sqlite3.connect(db).close()
    db.chmod(0o640)  # shared with the application's group on purpose
    init_node(
        tmp_path / "hq" / "mailsync.toml",
        role="host",
        node_id="hq",
        database=f"sqlite:///{db}",
        address="hq@x.test",
        mail="maildir:mail",
    )
    assert mode(db) == 0o640


def test_init_writes_config_key_and_database_owner_only(tmp_path: Path) -> None:
    config = tmp_path / "hq" / "mailsync.toml"
    init_node(
        config,
        role="host",
        node_id="hq",
        database=f"sqlite:///{tmp_path / 'hq.db'}",
        address="hq@x.test",
        mail="maildir:mail",
    )
    made = [config, tmp_path / "hq" / "mailsync.key", tmp_path / "hq.db"]
    assert {p.name: mode(p) for p in made} == {p.name: 0o600 for p in made}


def test_a_bundle_is_owner_only_even_over_a_file_that_was_readable(tmp_path: Path) -> None:
    path = tmp_path / "koeln.bundle"
    path.write_text("old")
    path.chmod(0o644)
    host = KeyPair.generate().public
    write_bundle(path, Bundle("hq", "hq@x.test", host, "koeln", "koeln@x.test"))
    assert mode(path) == 0o600
    sealed = tmp_path / "sealed.bundle"
    keys = KeyPair.generate()
    write_bundle(sealed, Bundle("hq", "hq@x.test", host, "k", "k@x.test", keys), "pass phrase")
    assert mode(sealed) == 0o600


def test_a_bundle_is_not_written_through_a_symbolic_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not yours")
    (tmp_path / "koeln.bundle").symlink_to(target)
    host = KeyPair.generate().public
    with pytest.raises(OSError):
        write_bundle(tmp_path / "koeln.bundle", Bundle("hq", "h@x.test", host, "k", "k@x.test"))
    assert target.read_text() == "not yours"


def test_maildir_delivery_writes_owner_only_files_and_folders(tmp_path: Path) -> None:
    box = tmp_path / "office" / "koeln@x.test"
    name = deliver(box, b"Subject: x\r\n\r\nbody\r\n")
    assert mode(box / "new" / name) == 0o600
    assert {d: mode(box / d) for d in ("", "tmp", "new", "cur")} == dict.fromkeys(
        ("", "tmp", "new", "cur"), 0o700
    )


def test_spool_files_on_disk_are_owner_only() -> None:
    spool = PartSpool(part_size=16)
    try:
        spool.write(b"x" * 64)  # past one part: the spool is now a file on disk
        file = spool._file._file  # the rolled-over temporary file
        assert stat.S_IMODE(os.fstat(file.fileno()).st_mode) == 0o600
    finally:
        spool.close()


def context(tmp_path: Path, **kw: object) -> TransportContext:
    return TransportContext(address="koeln@x.test", base_dir=tmp_path, timeout=10, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
def test_a_starttls_url_fails_closed_on_a_server_without_starttls(
    tmp_path: Path, protocol: str
) -> None:
    with plain_server(protocol) as server:
        url = f"{protocol}+starttls://koeln@127.0.0.1:{server.port}"
        opener = open_sender if protocol == "smtp" else open_receiver
        with pytest.raises(TransportError) as caught, opener(url, context(tmp_path)):
            pass
    command = "STLS" if protocol == "pop3" else "STARTTLS"
    message = str(caught.value)
    assert message == (
        f"{protocol}+starttls://koeln@127.0.0.1:{server.port}: the server does not offer "
        f"{command}; mailsync does not log in without TLS"
    )
    assert caught.value.hint and f"{protocol}s://" in caught.value.hint
    sent = " ".join(server.commands).upper()
    assert "USER" not in sent and "LOGIN" not in sent and "AUTH" not in sent, server.commands


def test_insecure_warns_at_every_connection_on_the_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with plain_server("pop3") as server, caplog.at_level(logging.WARNING, logger="mailsync"):
        url = f"pop3://koeln@127.0.0.1:{server.port}"
        for _ in range(2):
            with open_receiver(url, context(tmp_path, insecure=True)) as rx:
                assert list(rx.fetch()) == []
        with open_receiver(url, context(tmp_path)) as rx:  # not insecure: not a word
            assert list(rx.fetch()) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings
        == [
            f"pop3://koeln@127.0.0.1:{server.port}: TLS certificates are not checked "
            "(insecure = true); for tests only"
        ]
        * 2
    )


def test_insecure_warns_in_the_node_log_at_every_sync(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        with plain_server("pop3") as server:
            c.set_mailbox(
                "koeln",
                {
                    "address": f"koeln@{DOMAIN}",
                    "send": f"maildir:{tmp_path / 'mail'}",
                    "receive": f"pop3://koeln@127.0.0.1:{server.port}",
                    "insecure": True,
                },
            )
            for _ in range(2):
                assert not c.nodes["koeln"].sync().errors
        entries = [e for e in read_log(c.engines["koeln"]) if e.event == "insecure"]
        assert [e.level for e in entries] == ["warning", "warning"]
        assert "insecure = true" in entries[0].message
    finally:
        c.close()


def test_sync_against_a_pop3_server_without_stls_is_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    words = "init remote --id koeln --db sqlite:///app.db --address koeln@x.test"
    mailsync(*words.split(), "--mail", "maildir:mail", cwd=tmp_path)
    config = tmp_path / "mailsync.toml"
    with plain_server("pop3") as server:
        url = f"pop3+starttls://koeln@127.0.0.1:{server.port}"
        config.write_text(
            config.read_text().replace('receive = "maildir:mail"', f'receive = "{url}"')
        )
        proc = mailsync("sync", cwd=tmp_path, ok=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{url}: the server does not offer STLS" in errors[0], errors
