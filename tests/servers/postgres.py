"""A throwaway PostgreSQL server on 127.0.0.1 for the test session.

Facts from TEST-SERVERS.md: initdb and postgres refuse to run as root, so as
root they run as the ``postgres`` user (setpriv) in a fresh 0755 temp dir;
postgres runs in the foreground as our child and is stopped by PID (SIGINT =
fast shutdown; SIGQUIT, then SIGKILL to it and its children if it lingers);
ports come from below the kernel's ephemeral range, with a retry on a clash.
The child gets a parent-death signal, so a test run killed with SIGKILL
leaves no server running (its temp dir stays behind, though).
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
from psycopg import sql

NOT_FOUND = (
    "PostgreSQL server binaries not found; run `make test` (installs postgresql) "
    "or apt-get install postgresql"
)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0  # fast shutdown (SIGINT), then
QUIT_TIMEOUT_S = 5.0  # immediate shutdown (SIGQUIT), then SIGKILL
_CLASH = ("could not bind", "Address already in use")


def find_bindir() -> Path | None:
    """The directory holding ``postgres`` and ``initdb``: PATH first, then the
    newest ``/usr/lib/postgresql/*/bin`` (Debian keeps them off PATH)."""
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in bindir.parent.name.split(".") if p.isdigit())

    found = [
        Path(p).parent
        for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")
        if Path(p).with_name("initdb").exists()
    ]
    return max(found, key=version) if found else None


def _workdir_parent() -> str | None:
    """/dev/shm when it is a roomy tmpfs (initdb there takes half the time of a
    disk), else the usual temp dir. Docker's default 64 MB /dev/shm is too small."""
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= 1 << 30 and os.access("/dev/shm", os.W_OK | os.X_OK):
            return "/dev/shm"
    return None


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # after "(comm)": state, ppid, ...; comm may itself contain ")"
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class PostgresServer:
    """initdb + postgres in a temp dir; ``url(db)`` gives SQLAlchemy URLs."""

    def __init__(self, port_range: tuple[int, int] = (20000, 29999)) -> None:
        self.bindir = find_bindir()
        self.port_range = port_range
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self.bindir is None:
            raise RuntimeError(NOT_FOUND)
        if self.proc is not None:
            raise RuntimeError("PostgresServer already started")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="msync-pg-", dir=_workdir_parent()))
            self.dir.chmod(0o755)
            if os.geteuid() == 0:
                try:
                    pw = pwd.getpwnam("postgres")
                except KeyError:
                    raise RuntimeError(
                        "running as root, but there is no `postgres` user to run PostgreSQL "
                        "as (it refuses root); apt-get install postgresql creates it"
                    ) from None
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._initdb()
            for _attempt in range(5):
                self.port = random.randint(*self.port_range)
                if self._launch():
                    return self
            raise RuntimeError(
                f"PostgreSQL found no free port in {self.port_range}; log:\n{self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def _as_owner(self) -> list[str]:
        """Prefix: run as the postgres user when root, and die with us either way."""
        if shutil.which("setpriv") is None:
            return []
        prefix = ["setpriv", "--pdeathsig", "SIGINT"]
        if os.geteuid() == 0:
            prefix += ["--reuid=postgres", "--regid=postgres", "--init-groups"]
        return prefix

    def _initdb(self) -> None:
        assert self.dir is not None and self.bindir is not None
        done = subprocess.run(
            [
                *self._as_owner(),
                str(self.bindir / "initdb"),
                "-D",
                str(self.dir / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if done.returncode != 0:
            out = "\n".join(done.stdout.decode(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"initdb failed (exit {done.returncode}):\n{out}")

    def _launch(self) -> bool:
        """Start postgres on self.port; False on a port clash (retry another)."""
        assert self.dir is not None and self.bindir is not None
        data = self.dir / "data"
        with open(self.dir / "postgres.log", "wb") as log:  # the child keeps its own fd
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
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Wait until postmaster.pid says "ready" (so the port is ours, and a
        # connect cannot hang on someone else's listener), then connect.
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.proc = None
                if any(c in tail for c in _CLASH):
                    return False
                raise RuntimeError(f"PostgreSQL exited at start; log:\n{tail}")
            if self._ready(data):
                try:
                    with psycopg.connect(self.dsn("postgres"), connect_timeout=5):
                        return True
                except psycopg.OperationalError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(
            f"PostgreSQL did not accept connections in {START_TIMEOUT_S:.0f} s; "
            f"log:\n{self._log_tail()}"
        )

    def _ready(self, data: Path) -> bool:
        """postmaster.pid: line 1 the PID, line 8 the status ("ready" once it accepts)."""
        assert self.proc is not None
        try:
            lines = (data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.proc.pid) and lines[7].strip() == "ready"

    def stop(self) -> None:
        """Fast shutdown by PID; if it lingers, immediate shutdown, then SIGKILL to
        the postmaster and its children (each backend is its own process group,
        so killpg would miss them). Removes the temp dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGQUIT, QUIT_TIMEOUT_S)):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)  # postgres: SIGINT fast, SIGQUIT immediate shutdown
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait_s)
                    break
            else:
                for pid in [*children_of(proc.pid), proc.pid]:  # not reaped yet: still ours
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=10)
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

    # ------------------------------------------------------------ databases
    def _log_tail(self, lines: int = 15) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.dir / "postgres.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE (from ``template``: it must have no open connections)."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(query)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE … WITH (FORCE): ends the connections a test left open."""
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(query)
