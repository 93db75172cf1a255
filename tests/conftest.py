"""Shared fixtures: which databases the tests run on, and the PostgreSQL server.

``--db sqlite|postgresql|all`` (default all) picks the backends that the
``db_url`` fixture is parametrized over. The PostgreSQL server starts once,
lazily, for the whole session. Without its binaries the PostgreSQL tests
skip on a developer machine but FAIL in CI (``CI`` set), so a green CI run
always includes them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.mail import MailServers, binaries_present
from tests.servers.postgres import NOT_FOUND, PostgresServer, find_bindir

_names = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=("sqlite", "postgresql", "all"),
        default="all",
        help="databases to run the database tests on (default: all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        choice = metafunc.config.getoption("--db")
        params = []
        if choice in ("sqlite", "all"):
            params.append(pytest.param("sqlite", id="sqlite"))
        if choice in ("postgresql", "all"):
            params.append(pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql))
        metafunc.parametrize("backend", params)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_postgres(config: pytest.Config) -> None:
    """Skip unless PostgreSQL is selected and installed; missing in CI fails."""
    if config.getoption("--db") == "sqlite":
        pytest.skip("PostgreSQL not selected (--db sqlite)")
    if find_bindir() is None:
        if in_ci():
            pytest.fail(NOT_FOUND)
        pytest.skip(NOT_FOUND)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    require_postgres(request.config)
    port_base = 20000 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    with PostgresServer((port_base, port_base + 999)) as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    name = f"t_{os.getpid()}_{next(_names)}"
    pg_server.create_database(name)
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    if backend == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'app.db'}"


MAIL_MISSING = (
    "Dovecot (and, as root, Postfix) not available: install the Debian packages dovecot-core, "
    "dovecot-imapd, dovecot-pop3d, dovecot-lmtpd (and postfix), e.g. by `make test` as root"
)


@pytest.fixture(scope="session")
def mail_servers_session() -> Iterator[MailServers]:
    if not binaries_present():
        if in_ci():
            pytest.fail(MAIL_MISSING)
        pytest.skip(MAIL_MISSING)
    with MailServers() as servers:
        yield servers


@pytest.fixture
def mail_servers(mail_servers_session: MailServers) -> Iterator[MailServers]:
    """The session's mail servers, every mailbox empty, both servers running."""
    servers = mail_servers_session
    if servers.dovecot is None:
        servers.start_dovecot()
    if not servers.postfix_up:
        servers.start_postfix()
    servers.reset()
    yield servers
    if servers.dovecot is None:
        servers.start_dovecot()
    if not servers.postfix_up:
        servers.start_postfix()
