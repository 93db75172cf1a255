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
        ('send = "m"\nreceive = "m"\ninsecure = "yes"\n', "insecure must be a bool"),
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
