"""Real Postfix (SMTP) and Dovecot (IMAP, POP3, LMTP) for the test session.

Everything lives in one temp dir: a self-signed certificate for
``localhost``, Dovecot users from a passwd-file with Maildirs, LMTP on a unix
socket that Postfix delivers ``example.test`` mail to, and Dovecot's SASL
socket that Postfix authenticates submission against. Both listen on
127.0.0.1 ports below the ephemeral range. Facts behind the settings are in
TEST-SERVERS.md (root only for Postfix; anvil's auth penalty off so wrong-
password tests do not slow every later login; chroot off everywhere).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

DOMAIN = "example.test"
USERS = ("hq", "koeln", "berlin", "muenchen", "admin")


def password_of(user: str) -> str:
    return f"pw-{user}-Geheim"


def binaries_present() -> bool:
    needed = ["dovecot", "doveadm", "openssl"] + (["postfix"] if os.geteuid() == 0 else [])
    return all(shutil.which(b) for b in needed)


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, deadline_s: float = 20) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.02)
    return False


class _LmtpRelay:
    """aiosmtpd handler: hands each message to Dovecot's LMTP socket, and only
    then answers 250 (as Postfix does once the message is queued)."""

    def __init__(self, lmtp_socket: Path, unknown: set[str]) -> None:
        self.socket = lmtp_socket
        self.unknown = unknown  # users whose RCPT TO gets a 550, as Postfix answers

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, options: object
    ) -> str:
        if address.lower().removesuffix(f"@{DOMAIN}") in self.unknown:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        import asyncio
        import smtplib

        def deliver() -> None:
            with smtplib.LMTP(str(self.socket)) as lmtp:
                lmtp.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.content)  # type: ignore[attr-defined]

        try:
            await asyncio.get_running_loop().run_in_executor(None, deliver)
        except smtplib.SMTPRecipientsRefused:
            return "550 5.1.1 unknown recipient"
        except (OSError, smtplib.SMTPException):
            return "451 4.3.0 delivery failed, try again"
        return "250 OK"


class MailServers:
    """Dovecot + an SMTP server; ports in ``self.ports`` (smtp, smtps, imap, imaps, pop3, pop3s).

    The SMTP server is Postfix when running as root (what companies run, and
    what CI exercises) and aiosmtpd relaying into Dovecot's LMTP otherwise
    (``smtp="aiosmtpd"`` forces it), so a developer without root runs the
    same tests.
    """

    def __init__(self, port_base: int = 12000, smtp: str | None = None) -> None:
        self.port_base = port_base
        self.smtp = smtp or ("postfix" if os.geteuid() == 0 else "aiosmtpd")
        self.dir = Path()
        self.ports: dict[str, int] = {}
        self.dovecot: subprocess.Popen[bytes] | None = None
        self.postfix_up = False
        self._controllers: list[object] = []
        #: users the SMTP server answers RCPT TO with 550 (see ``set_unknown``)
        self.unknown: set[str] = set()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        self.dir = Path(tempfile.mkdtemp(prefix="msync-mail-"))
        self.dir.chmod(0o755)
        self._cert()
        for _ in range(5):
            base = self.port_base + random.randrange(0, 90) * 10
            self.ports = {
                name: base + i
                for i, name in enumerate(("smtp", "smtps", "imap", "imaps", "pop3", "pop3s"))
            }
            if all(self._port_free(p) for p in self.ports.values()):
                break
        self.start_dovecot()
        self.start_postfix()
        return self

    def stop(self) -> None:
        self.stop_postfix()
        self.stop_dovecot()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    # ----------------------------------------------------------------- TLS
    @property
    def cert(self) -> Path:
        return self.dir / "cert.pem"

    def _cert(self) -> None:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(self.dir / "key.pem"),
                "-out",
                str(self.cert),
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )
        (self.dir / "key.pem").chmod(0o600)

    # ------------------------------------------------------------- Dovecot
    def start_dovecot(self) -> None:
        d = self.dir
        mail_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
        mail_gid = pwd.getpwnam("nobody").pw_gid if os.geteuid() == 0 else os.getgid()
        for sub in ("run", "mail", "state"):
            (d / sub).mkdir(exist_ok=True)
        os.chown(d / "mail", mail_uid, mail_gid)
        (d / "users").write_text(
            "".join(f"{u}@{DOMAIN}:{{PLAIN}}{password_of(u)}::::::\n" for u in USERS)
        )
        p = self.ports
        unprivileged = ""
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            unprivileged = (
                f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
                f"default_login_user = {me}\n"
                "service imap-login {\n  chroot =\n}\nservice pop3-login {\n  chroot =\n}\n"
                "service anvil {\n  chroot =\n}\n"
            )
        conf = (
            unprivileged
            + f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap pop3 lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {min(mail_uid, 100) if mail_uid else 0}
mail_location = maildir:{d}/mail/%n
mail_max_userip_connections = 200
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={d}/mail/%n
}}
service imap-login {{
  inet_listener imap {{
    port = {p["imap"]}
  }}
  inet_listener imaps {{
    port = {p["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {p["pop3"]}
  }}
  inet_listener pop3s {{
    port = {p["pop3s"]}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener {d}/lmtp {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener {d}/auth {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAIN}
}}
"""
        )
        (d / "dovecot.conf").write_text(conf)
        with open(d / "dovecot.stderr", "ab") as err:
            self.dovecot = subprocess.Popen(
                ["dovecot", "-F", "-c", str(d / "dovecot.conf")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        if not _wait_port(p["imap"], self.dovecot) or not _wait_port(p["pop3s"], self.dovecot):
            raise RuntimeError(f"Dovecot did not start:\n{self._tail('dovecot.log')}")

    def stop_dovecot(self) -> None:
        proc, self.dovecot = self.dovecot, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # abrupt: sessions die with it
            proc.wait(timeout=10)

    # ------------------------------------------------------------- Postfix
    def _postfix_dirs(self) -> Path:
        pf = self.dir / "postfix"
        return pf

    def start_postfix(self) -> None:
        """Start the SMTP server (Postfix, or the aiosmtpd stand-in)."""
        if self.smtp == "aiosmtpd":
            self._start_aiosmtpd()
            return
        pf = self._postfix_dirs()
        first = not pf.exists()
        if first:
            (pf / "queue").mkdir(parents=True)
            (pf / "data").mkdir()
            self._write_vmailbox(pf)
            (pf / "maillog").touch()
            shutil.chown(pf / "maillog", "postfix", "postdrop")
            shutil.chown(pf / "data", "postfix", "postfix")
            self._write_postfix_config(pf)
            subprocess.run(
                ["postfix", "-c", str(pf), "set-permissions"], check=False, capture_output=True
            )
        subprocess.run(["postfix", "-c", str(pf), "start"], check=True, capture_output=True)
        self.postfix_up = True
        if not _wait_port(self.ports["smtp"], None):
            raise RuntimeError(f"Postfix did not start:\n{self._tail('postfix/maillog')}")

    def _write_vmailbox(self, pf: Path) -> None:
        known = [u for u in USERS if u not in self.unknown]
        (pf / "vmailbox").write_text("".join(f"{u}@{DOMAIN} {u}/\n" for u in known))

    def set_unknown(self, *users: str) -> None:
        """Make the SMTP server refuse mail for ``users`` at RCPT TO with a 550
        (their mailboxes deleted at the provider); no users: all known again.

        Postfix reads its mailbox table at process start: it is reloaded, and
        this returns once a new connection gets the new answer for each user.
        """
        changed = self.unknown.symmetric_difference(users)
        self.unknown.clear()
        self.unknown.update(users)  # aiosmtpd's relay holds this very set
        if self.smtp == "aiosmtpd" or not changed:
            return
        pf = self._postfix_dirs()
        self._write_vmailbox(pf)
        if not self.postfix_up:
            return  # read when it starts
        subprocess.run(["postfix", "-c", str(pf), "reload"], check=True, capture_output=True)
        deadline = time.monotonic() + 20
        for user in sorted(changed):
            want = 550 if user in self.unknown else 250
            while (code := self._rcpt_code(user)) != want:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Postfix still answers {code} for {user}, not {want}")
                time.sleep(0.02)

    def _rcpt_code(self, user: str) -> int:
        """What a new SMTP connection hears at RCPT TO for ``user`` (nothing is sent)."""
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as smtp:
            smtp.ehlo()
            smtp.mail(f"postmaster@{DOMAIN}")
            code, _ = smtp.rcpt(f"{user}@{DOMAIN}")
            smtp.rset()
            return code

    def _write_postfix_config(self, pf: Path) -> None:
        d, p = self.dir, self.ports
        main = f"""
compatibility_level = 3.6
queue_directory = {pf}/queue
data_directory = {pf}/data
myhostname = mail.{DOMAIN}
mydomain = {DOMAIN}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = texthash:{pf}/vmailbox
virtual_transport = lmtp:unix:{d}/lmtp
local_transport = error:local delivery is disabled
default_transport = error:outside delivery is disabled
relay_transport = error:outside delivery is disabled
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtpd_sasl_type = dovecot
smtpd_sasl_path = {d}/auth
smtpd_sasl_auth_enable = yes
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
maillog_file = {pf}/maillog
maillog_file_prefixes = {pf}
biff = no
smtputf8_enable = no
message_size_limit = 10240000
"""
        (pf / "main.cf").write_text(main)
        services = [
            (str(p["smtp"]), "inet", "n", "-", "n", "-", "-", "smtpd"),
            (
                str(p["smtps"]),
                "inet",
                "n",
                "-",
                "n",
                "-",
                "-",
                "smtpd\n  -o smtpd_tls_wrappermode=yes",
            ),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        (pf / "master.cf").write_text("".join(" ".join(s) + "\n" for s in services))

    def _start_aiosmtpd(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        users = {f"{u}@{DOMAIN}".encode(): password_of(u).encode() for u in USERS}

        def authenticate(
            server: object, session: object, envelope: object, mechanism: str, data: object
        ) -> AuthResult:
            ok = isinstance(data, LoginPassword) and users.get(data.login) == data.password
            return AuthResult(success=ok)

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(self.cert), str(self.dir / "key.pem"))
        relay = _LmtpRelay(self.dir / "lmtp", self.unknown)
        common = {
            "hostname": "127.0.0.1",
            "authenticator": authenticate,
            "auth_require_tls": False,
            "data_size_limit": 10240000,
        }
        starttls = Controller(relay, port=self.ports["smtp"], tls_context=tls, **common)
        implicit = Controller(relay, port=self.ports["smtps"], ssl_context=tls, **common)
        for controller in (starttls, implicit):
            controller.start()
        self._controllers = [starttls, implicit]
        self.postfix_up = True

    def stop_postfix(self) -> None:
        if not self.postfix_up:
            return
        self.postfix_up = False
        if self._controllers:
            for controller in self._controllers:
                controller.stop()  # type: ignore[attr-defined]
            self._controllers = []
            return
        pf = self._postfix_dirs()
        pid_file = pf / "queue" / "pid" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self._port_free(self.ports["smtp"]):
            time.sleep(0.05)

    # ---------------------------------------------------------------- tools
    def _tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / name).read_text().splitlines()[-20:])
        return ""

    def wait_delivered(self, timeout: float = 30.0) -> None:
        """Until Postfix's queue is empty (aiosmtpd delivers before it answers)."""
        if self.smtp != "postfix" or not self.postfix_up:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["postqueue", "-c", str(self._postfix_dirs()), "-p"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if "is empty" in out:
                return
            time.sleep(0.02)
        raise AssertionError(f"Postfix queue not empty after {timeout} s:\n{out}")

    def reset(self) -> None:
        """Empty every mailbox and know every user again (between tests)."""
        self.set_unknown()
        for user in USERS:
            subprocess.run(
                [
                    "doveadm",
                    "-c",
                    str(self.dir / "dovecot.conf"),
                    "expunge",
                    "-u",
                    f"{user}@{DOMAIN}",
                    "mailbox",
                    "*",
                    "all",
                ],
                check=False,
                capture_output=True,
            )

    def count(self, user: str, folder: str = "INBOX") -> int:
        out = subprocess.run(
            [
                "doveadm",
                "-c",
                str(self.dir / "dovecot.conf"),
                "mailbox",
                "status",
                "-u",
                f"{user}@{DOMAIN}",
                "messages",
                folder,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return int(out.split("=")[1]) if "=" in out else 0
