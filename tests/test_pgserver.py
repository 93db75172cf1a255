"""The test suite's own database servers: SQLite files and a real PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from tests.conftest import require_postgres
from tests.servers import postgres
from tests.servers.postgres import PostgresServer, children_of


def test_table_roundtrip(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        meta = sa.MetaData()
        items = sa.Table(
            "items",
            meta,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(items.insert(), [{"id": 1, "name": "Köln"}, {"id": 2, "name": "Berlin"}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(items.c.id, items.c.name).order_by(items.c.id)).all()
        assert [tuple(r) for r in rows] == [(1, "Köln"), (2, "Berlin")]
    finally:
        engine.dispose()


_seen_databases: set[str] = set()


@pytest.mark.postgresql
@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_database(run: int, pg_url: str) -> None:
    """Every pg_url is a new, empty database; those of earlier tests are dropped."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            assert sa.inspect(conn).get_table_names() == []
            existing = set(conn.execute(sa.text("SELECT datname FROM pg_database")).scalars())
            conn.execute(sa.text("CREATE TABLE marker (run integer)"))
    finally:
        engine.dispose()
    assert name not in _seen_databases
    assert not _seen_databases & existing, "an earlier test's database was not dropped"
    _seen_databases.add(name)


@pytest.mark.postgresql
def test_create_database_from_template(pg_url: str, pg_server: PostgresServer) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x integer)"))
            conn.execute(sa.text("INSERT INTO t VALUES (42)"))
    finally:
        engine.dispose()  # a template must have no open connections
    template = pg_url.rsplit("/", 1)[1]
    copy = f"{template}_copy"
    pg_server.create_database(copy, template=template)
    try:
        with psycopg.connect(pg_server.dsn(copy)) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        pg_server.drop_database(copy)


# ---------------------------------------------------------------- lifecycle
@pytest.fixture
def pg_binaries(request: pytest.FixtureRequest) -> None:
    """For tests that start servers of their own."""
    require_postgres(request.config)


def _alive(pid: int) -> bool:
    """Running (a zombie left for init to reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.postgresql
@pytest.mark.usefixtures("pg_binaries")
def test_stop_leaves_no_process_and_no_files() -> None:
    with PostgresServer() as server:
        assert server.proc is not None and server.dir is not None
        pid, workdir = server.proc.pid, server.dir
        conn = psycopg.connect(server.dsn("postgres"))
        try:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            children = children_of(pid)
            assert len(children) >= 3  # checkpointer, walwriter, ..., our backend
            server.stop()  # fast shutdown ends our open session too
        finally:
            conn.close()
        assert server.proc is None and server.dir is None
        server.stop()  # idempotent; __exit__ calls it again
    assert not _alive(pid)
    assert [c for c in children if _alive(c)] == []
    assert not workdir.exists()


@pytest.mark.postgresql
@pytest.mark.usefixtures("pg_binaries")
def test_stop_kills_a_server_that_ignores_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "STOP_TIMEOUT_S", 0.3)
    monkeypatch.setattr(postgres, "QUIT_TIMEOUT_S", 0.3)
    with PostgresServer() as server:
        assert server.proc is not None
        pid, workdir = server.proc.pid, server.dir
        conn = psycopg.connect(server.dsn("postgres"))
        try:
            children = children_of(pid)
            os.kill(pid, signal.SIGSTOP)  # deaf to SIGINT and SIGQUIT, not to SIGKILL
            server.stop()
        finally:
            conn.close()
    assert not _alive(pid)
    assert [c for c in children if _alive(c)] == []
    assert workdir is not None and not workdir.exists()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A 127.0.0.1 port below the ephemeral range that something else listens on."""
    with socket.socket() as sock:
        for _ in range(50):
            port = random.randint(30000, 32000)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            sock.listen()
            yield port
            return
        pytest.fail("no free port to occupy")


@pytest.mark.postgresql
@pytest.mark.usefixtures("pg_binaries")
def test_port_clash_is_retried_then_reported_with_the_log(busy_port: int) -> None:
    server = PostgresServer(port_range=(busy_port, busy_port))
    with pytest.raises(RuntimeError, match="no free port") as failure:
        server.start()
    assert "Address already in use" in str(failure.value)
    assert server.proc is None and server.dir is None  # cleaned up after the failure


def test_missing_binaries_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "find_bindir", lambda: None)
    with pytest.raises(RuntimeError, match="PostgreSQL server binaries not found"):
        PostgresServer().start()
