"""``mailsync init`` on a terminal asks for the mailbox (issue 20, item 2),
through a real pseudo-terminal: a wrong URL is asked again, a password
typed is never echoed and lands in an owner-only file; into a pipe, no
question is asked and the old default stays."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

INIT = ("init", "host", "--id", "hq", "--db", "sqlite:///app.db", "--address", "hq@x.test")
PASSWORD = "s3cret-Pw-ÄÖ"


class Terminal:
    """``mailsync ARGS`` in a child whose controlling terminal is a pty."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
        env.pop("MAILSYNC_CONFIG", None)
        cwd.mkdir(parents=True, exist_ok=True)
        pid, fd = pty.fork()
        if pid == 0:  # the child: become mailsync at once
            try:
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, "-m", "mailsync", *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = ""
        self.seen = 0  # what expect() has consumed

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child is gone
            return False
        self.out += chunk.decode("utf-8", "replace")
        return bool(chunk)

    def expect(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (at := self.out.find(text, self.seen)) < 0:
            assert time.monotonic() < deadline, f"no {text!r} in {self.out[self.seen :]!r}"
            assert self._read(deadline), f"ended before {text!r}: {self.out!r}"
        self.seen = at + len(text)

    def answer(self, prompt: str, text: str) -> None:
        self.expect(prompt)
        os.write(self.fd, text.encode() + b"\r")

    def finish(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            assert time.monotonic() < deadline, f"no end: {self.out!r}"
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_init_asks_for_a_providers_mailbox_and_never_echoes_the_password(tmp_path: Path) -> None:
    t = Terminal(tmp_path, *INIT)
    t.answer("send URL", "ftp://hq%40x.test@ftp.x.test")
    t.expect("'ftp' cannot send")  # the operator's slip: asked again
    t.answer("send URL", "smtp+starttls://hq%40x.test@smtp.x.test:587")
    t.answer("receive URL", "imaps://hq%40x.test@imap.x.test")
    t.answer("where does the password come from?", "ldap")
    t.expect("answer env or file")
    t.answer("where does the password come from?", "file")
    t.answer("the password file", "")
    t.answer("type the password now?", "y")
    # click writes "password:", then getpass turns echo off and writes " ":
    # an answer before that space would be typed with echo still on
    t.answer("password: ", PASSWORD)
    t.answer("Repeat for confirmation: ", PASSWORD)
    code = t.finish()
    assert code == 0, t.out
    assert PASSWORD not in t.out  # typed blind
    assert "created: config" in t.out
    cfg = tomllib.loads((tmp_path / "mailsync.toml").read_text())
    box = cfg["mailbox"]
    assert box["send"] == "smtp+starttls://hq%40x.test@smtp.x.test:587"
    assert box["receive"] == "imaps://hq%40x.test@imap.x.test"
    assert box["password_file"] == "mail-password" and "password_env" not in box
    secret = tmp_path / "mail-password"
    assert secret.read_text(encoding="utf-8") == PASSWORD + "\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert PASSWORD not in (tmp_path / "mailsync.toml").read_text(encoding="utf-8")


def test_init_on_a_terminal_with_an_env_variable_or_a_post_office(tmp_path: Path) -> None:
    t = Terminal(tmp_path / "a", *INIT)
    t.answer("send URL", "smtps://hq%40x.test@mail.x.test")
    t.answer("receive URL", "pop3s://hq%40x.test@mail.x.test")
    t.answer("where does the password come from?", "")
    t.answer("the environment variable's name", "HQ_MAIL_PW")
    assert t.finish() == 0, t.out
    box = tomllib.loads((tmp_path / "a" / "mailsync.toml").read_text())["mailbox"]
    assert box["password_env"] == "HQ_MAIL_PW" and box["receive"].startswith("pop3s://")
    # Enter twice: a local post office, no password asked
    t = Terminal(tmp_path / "b", *INIT)
    t.answer("send URL", "")
    t.answer("receive URL", "")
    assert t.finish() == 0, t.out
    assert "password" not in t.out.split("receive URL")[-1].split("created")[0]
    box = tomllib.loads((tmp_path / "b" / "mailsync.toml").read_text())["mailbox"]
    assert box["send"] == box["receive"] == "maildir:mail"


def test_given_urls_or_no_terminal_ask_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    t = Terminal(tmp_path / "a", *INIT, "--mail", "maildir:post")
    assert t.finish() == 0, t.out
    assert "send URL" not in t.out
    (tmp_path / "b").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "mailsync", *INIT],
        cwd=tmp_path / "b",
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "URL" not in done.stdout
    box = tomllib.loads((tmp_path / "b" / "mailsync.toml").read_text())["mailbox"]
    assert box["send"] == box["receive"] == "maildir:mail"
