"""Config files: every mistake is one clear line that names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsync.config import load_config
from mailsync.errors import ConfigError
from mailsync.transport import TransportContext, open_receiver, open_sender
from mailsync.transport.account import Secret

BASE = '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///x.db"\n'


def write(tmp_path: Path, mailbox: str) -> Path:
    path = tmp_path / "mailsync.toml"
    path.write_text(BASE + '[mailbox]\naddress = "hq@x.test"\n' + mailbox)
    return path


def test_a_full_mailbox_section_loads(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            'send = "smtp+starttls://hq%40x.test@smtp.x.test:587"\n'
            'receive = "pop3s://hq%40x.test@pop.x.test"\npassword_file = "pw.txt"\n'
            'ca_file = "ca.pem"\ntimeout = 5\nforward_unrecognized = "admin@x.test"\n'
            "max_message_bytes = 5000000\n",
        )
    )
    box = cfg.mailbox
    assert box.secret.file == tmp_path / "pw.txt" and box.ca_file == tmp_path / "ca.pem"
    assert box.timeout == 5.0 and box.forward_unrecognized == "admin@x.test"


@pytest.mark.parametrize(
    ("mailbox", "message"),
    [
        ('send = "m"\nreceive = "m"\npassword_env = "A"\npassword_file = "B"\n', "only one of"),
        ('send = "m"\nreceive = "m"\nmax_message_bytes = 10\n', "at least 10000"),
        ('send = "m"\nreceive = "m"\ntimeout = -1\n', "timeout must be positive"),
        ('send = "m"\nreceive = "m"\nforward_unrecognized = "nobody"\n', "not an e-mail"),
        (
            'send = "m"\nreceive = "m"\ninsecure = "yes"\n',
            r'mailsync.toml:\d+ \[mailbox\]: insecure must be true or false, not "yes"',
        ),
    ],
)
def test_bad_mailbox_settings(tmp_path: Path, mailbox: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, mailbox))


@pytest.mark.parametrize(
    ("url", "receive", "message"),
    [
        ("imaps://u@host", False, "cannot send with scheme 'imaps'"),
        ("smtp://u@host", True, "cannot receive with scheme 'smtp'"),
        ("ftp://u@host", True, "cannot receive with scheme 'ftp'"),
        ("smtp://u:secret@host", False, "put no password in the URL"),
        ("smtp://", False, "names no server"),
        ("nocolon", False, "has no scheme"),
    ],
)
def test_bad_mailbox_urls(tmp_path: Path, url: str, receive: bool, message: str) -> None:
    ctx = TransportContext(address="hq@x.test", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        (open_receiver if receive else open_sender)(url, ctx)


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW_TEST", "from-env")
    assert Secret(env="PW_TEST").resolve("x") == "from-env"
    (tmp_path / "pw").write_text("from-file\n")
    assert Secret(file=tmp_path / "pw").resolve("x") == "from-file"
    assert Secret(command="echo from-command").resolve("x") == "from-command"
    with pytest.raises(ConfigError, match="PW_MISSING is not set"):
        Secret(env="PW_MISSING").resolve("x")
    with pytest.raises(ConfigError, match="exited with 1"):
        Secret(command="false").resolve("x")
    with pytest.raises(ConfigError, match="cannot read password file"):
        Secret(file=tmp_path / "nope").resolve("x")


MAILDIR = 'send = "maildir:mail"\nreceive = "maildir:mail"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the misspellings: refused, with the line and what was meant
        (
            BASE.replace("[node]\n", "[node]\nlog_retension_days = 5\n")
            + '[mailbox]\naddress = "hq@x.test"\n'
            + MAILDIR,
            r"mailsync.toml:2 \[node\]: unknown setting 'log_retension_days' "
            r"\(did you mean 'log_retention_days'\?\)",
        ),
        (
            BASE + '[mailbox]\naddress = "hq@x.test"\n' + MAILDIR + "keep_procesed = false\n",
            r"mailsync.toml:9 \[mailbox\]: unknown setting 'keep_procesed' "
            r"\(did you mean 'keep_processed'\?\)",
        ),
        (
            BASE + '[mailbox]\naddress = "hq@x.test"\n' + MAILDIR + "[limit]\nmax_parts = 3\n",
            r"unknown section \[limit\] \(did you mean \[limits\]\?\)",
        ),
        (
            BASE + 'batch_rows = "5000"\n[mailbox]\naddress = "hq@x.test"\n' + MAILDIR,
            r'mailsync.toml:5 \[node\]: batch_rows must be a whole number, not "5000"',
        ),
        (
            BASE + 'batch_rows = true\n[mailbox]\naddress = "hq@x.test"\n' + MAILDIR,
            r'batch_rows must be a whole number, not "true"',
        ),
        (
            BASE + 'resend_after_minutes = "1h"\n[mailbox]\naddress = "hq@x.test"\n' + MAILDIR,
            r'resend_after_minutes must be a number, not "1h"',
        ),
        (
            BASE
            + '[mailbox]\naddress = "hq@x.test"\nsend = "imaps://u@h"\nreceive = "maildir:m"\n',
            r"send URL 'imaps://u@h': 'imaps' cannot send",
        ),
        (
            BASE
            + '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:m"\nreceive = "smtps://u@h"\n',
            r"receive URL 'smtps://u@h': 'smtps' cannot receive",
        ),
        (
            BASE
            + '[mailbox]\naddress = "hq@x.test"\n'
            + MAILDIR
            + '[[schedule]]\nevery = "15m"\nbetwen = "06:00-20:00"\n',
            r"\[\[schedule\]\] #1: unknown setting 'betwen' \(did you mean 'between'\?\)",
        ),
    ],
)
def test_a_mistyped_config_is_one_line_with_file_line_and_meaning(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "mailsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_database_password_comes_from_a_source_not_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 20, item 10: like the mailbox's, never in the file itself (or
    from libpq's own PGPASSWORD / ~/.pgpass when none is named)."""
    url = "postgresql+psycopg://erp@db.example/firma"
    node = f'[node]\nid = "hq"\nrole = "host"\ndatabase = "{url}"\n'
    box = '[mailbox]\naddress = "hq@x.test"\n' + MAILDIR
    path = tmp_path / "mailsync.toml"
    path.write_text(node + box)
    assert load_config(path).database_url() == url  # libpq finds it, or asks
    path.write_text(node + 'database_password_env = "ERP_DB_PW"\n' + box)
    monkeypatch.setenv("ERP_DB_PW", "s3cr:t@/x")
    filled = load_config(path).database_url()
    from sqlalchemy.engine import make_url

    assert make_url(filled).password == "s3cr:t@/x" and "s3cr" not in path.read_text()
    monkeypatch.delenv("ERP_DB_PW")
    with pytest.raises(ConfigError, match="ERP_DB_PW is not set"):
        load_config(path).database_url()
    (tmp_path / "db.pw").write_text("from-a-file\n")
    path.write_text(node + 'database_password_file = "db.pw"\n' + box)
    assert make_url(load_config(path).database_url()).password == "from-a-file"
    path.write_text(node + 'database_password_env = "A"\ndatabase_password_file = "db.pw"\n' + box)
    with pytest.raises(ConfigError, match="only one of database_password_env"):
        load_config(path)
    inline = node.replace("erp@", "erp:pw@")
    path.write_text(inline + 'database_password_file = "db.pw"\n' + box)
    with pytest.raises(ConfigError, match="give it in one place"):
        load_config(path).database_url()


def test_a_new_config_names_every_setting_and_each_loads(tmp_path: Path) -> None:
    """`init` writes every setting there is (issue 20, item 2): the ones not
    given are commented out at their defaults; all of them uncommented, the
    file still loads — so no name there is misspelt — and gives the defaults."""
    import re

    from mailsync.config import render_config

    text = render_config(
        node_id="hq",
        role="host",
        database="sqlite:///app.db",
        address="hq@x.test",
        mail="maildir:mail",
        send="smtp+starttls://hq%40x.test@mail.x.test:587",
        receive="imaps://hq%40x.test@mail.x.test",
        password_env="HQ_MAIL_PW",
    )
    path = tmp_path / "mailsync.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert (
        cfg.mailbox.send.startswith("smtp+starttls://") and cfg.mailbox.secret.env == "HQ_MAIL_PW"
    )
    for needed in ("log_retention_days", "timezone", "[[schedule]]", "database_password_env"):
        assert needed in text, needed
    opened = re.sub(r"(?m)^# (\[\[?\w+\]\]?|\w+ = )", r"\1", text)
    # one database password source, not three (the loader refuses that)
    opened = re.sub(r"(?m)^database_password_(file|command) = .*\n", "", opened)
    path.write_text(opened)
    full = load_config(path)
    assert full.schedules and full.timezone == "Europe/Berlin"
    assert full.alerts.to == ("admin@example.com",) and full.alerts.silent_days == 3
    assert full.limits == load_config(path).limits
    with pytest.raises(ConfigError, match="only one of --password-env and --password-file"):
        render_config(
            node_id="hq",
            role="host",
            database="sqlite:///app.db",
            address="hq@x.test",
            mail="maildir:mail",
            password_env="A",
            password_file="B",
        )
