"""Who the workers of a node are: ``mailsync_workers`` and the locks that
say which of them live.

A worker registers once (a row: machine, pid, since when) and holds the
advisory lock named by its row id on its own connection for as long as
it runs; a row whose lock nobody holds is a worker that stopped or died.
The heartbeat column is for people (``status``): liveness is the lock.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select, update

from mailsync.dialects import pg_locks
from mailsync.errors import ConfigError
from mailsync.store.tables import now, workers_table


@dataclass(frozen=True)
class WorkerRow:
    """One worker as ``status`` shows it."""

    id: int
    host: str
    pid: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    alive: bool
    stopped_at: dt.datetime | None
    cycles: int
    links: int
    coordinated_at: dt.datetime | None
    last_cycle_at: dt.datetime | None
    last_outcome: str | None


def require_postgresql(engine: Engine, where: str) -> None:
    """Several workers share a node through PostgreSQL's locks: refuse
    anything else with what to do."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(
            f"{where}: several workers need the host's database on PostgreSQL "
            f"(this one is {engine.dialect.name})",
            hint="run `mailsync serve` without --workers: one process serves every station",
        )


def register(session: Connection) -> int:
    """A new worker's row, and its life lock taken on ``session`` (an
    ``AUTOCOMMIT`` connection the worker keeps)."""
    stamp = now()
    worker_id = int(
        session.execute(
            workers_table.insert()
            .values(
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=stamp,
                heartbeat_at=stamp,
                cycles=0,
                links=0,
            )
            .returning(workers_table.c.id)
        ).scalar_one()
    )
    if not pg_locks.try_lock(session, pg_locks.WORKER, worker_id):  # pragma: no cover
        raise ConfigError(f"worker {worker_id}: its registration is held by another session")
    return worker_id


def live_ids(conn: Connection) -> list[int]:
    """The ids of the workers alive now, in order."""
    return sorted(pg_locks.held(conn, pg_locks.WORKER))


def beat(engine: Engine, worker_id: int, **values: object) -> None:
    """The heartbeat, with whatever else the worker reports (its last cycle)."""
    with engine.begin() as conn:
        conn.execute(
            update(workers_table)
            .where(workers_table.c.id == worker_id)
            .values(heartbeat_at=now(), **values)
        )


def finished_cycle(engine: Engine, worker_id: int, **values: object) -> None:
    """A cycle ended: counted, with what it served and how it went."""
    beat(engine, worker_id, cycles=workers_table.c.cycles + 1, **values)


def stopped(engine: Engine, worker_id: int) -> None:
    beat(engine, worker_id, stopped_at=now())


def listing(engine: Engine, *, recent: dt.timedelta = dt.timedelta(days=1)) -> list[WorkerRow]:
    """The workers alive, and those that stopped or died within ``recent``
    (for ``status``); empty on a database that is not PostgreSQL."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        alive = set(pg_locks.held(conn, pg_locks.WORKER))
        rows = conn.execute(
            select(workers_table)
            .where(
                workers_table.c.id.in_(sorted(alive))
                | (workers_table.c.heartbeat_at > now() - recent)
            )
            .order_by(workers_table.c.id)
        ).all()
    return [
        WorkerRow(
            r.id,
            r.host,
            r.pid,
            r.started_at,
            r.heartbeat_at,
            r.id in alive,
            r.stopped_at,
            r.cycles,
            r.links,
            r.coordinated_at,
            r.last_cycle_at,
            r.last_outcome,
        )
        for r in rows
    ]


def live_hosts(conn: Connection) -> set[str]:
    """The machines live workers of this node run on (none off PostgreSQL)."""
    if conn.dialect.name != "postgresql":
        return set()
    alive = pg_locks.held(conn, pg_locks.WORKER)
    if not alive:
        return set()
    rows = conn.execute(select(workers_table.c.host).where(workers_table.c.id.in_(sorted(alive))))
    return {r[0] for r in rows}


def any_alive(engine: Engine) -> bool:
    """Whether a worker serves this node now (a plain ``serve`` or ``sync``
    must then give way)."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return bool(pg_locks.held(conn, pg_locks.WORKER))
