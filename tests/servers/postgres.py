"""A throwaway PostgreSQL server on 127.0.0.1 for the test session.

Facts from TEST-SERVERS.md: initdb and postgres refuse to run as root, so as
root they run as the ``postgres`` user (setpriv) in a fresh 0755 temp dir;
postgres runs in the foreground as our child and is stopped by PID; ports
come from below the kernel's ephemeral range, with a retry on a clash.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

NOT_FOUND = (
    "PostgreSQL server binaries not found; run `make test` (installs postgresql) "
    "or apt-get install postgresql"
)


def find_bindir() -> Path | None:
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """initdb + postgres in a temp dir; ``url(db)`` gives SQLAlchemy URLs."""

    def __init__(self, port_range: tuple[int, int] = (20000, 29999)) -> None:
        self.bindir = find_bindir()
        self.port_range = port_range
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

    def start(self) -> Self:
        if self.bindir is None:
            raise RuntimeError(NOT_FOUND)
        self.dir = Path(tempfile.mkdtemp(prefix="msync-pg-"))
        self.dir.chmod(0o755)
        data = self.dir / "data"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [
                *self._as_owner(),
                str(self.bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        for _attempt in range(5):
            self.port = random.randint(*self.port_range)
            if self._launch(data):
                return self
        raise RuntimeError(f"PostgreSQL did not start; log:\n{self._log_tail()}")

    def _launch(self, data: Path) -> bool:
        assert self.dir is not None
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                *self._as_owner(),
                str(self.bindir / "postgres"),
                "-D",
                str(data),
                "-k",
                str(self.dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # port clash or other failure: caller retries
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not accept connections in 30 s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "postgres.log").read_text().splitlines()[-15:])
        return ""

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}'.encode())

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
