"""Bulk enrollment: ``mailsync station add --csv FILE`` adds thousands of
stations in one go, their keys and bundles written together (issue 21,
item 3).

All or nothing. Every row is checked first — on its own, against the
other rows and against the stations the host has (:mod:`mailsync.station_csv`)
— and so is every file to be written (none may exist: a bundle is never
overwritten); any problem and nothing is added, no file written.

No private key is ever lost. A station whose keys mailsync makes exists
only with its bundle, so the order is:

1. every bundle (and the passphrase list) is written into a staging
   folder inside the bundle folder, and synced to the disk;
2. the stations, their links, keys and log lines commit in **one**
   transaction (a handful of executemany statements, not a transaction or
   a dozen statements per station: 10,000 stations take seconds);
3. the staged files are put in place (a hard link, which never replaces a
   file, then the staged name removed).

A failure in 1 or 2 (a full disk, the database gone) removes what was
staged: nothing was added. A failure in 3 — or a crash between 2 and 3 —
leaves the bundles in the staging folder (``DIR/.mailsync-enroll-…``),
named in the error and in the batch's log line: move them by hand.

Passphrases. Sealed bundles (rows without a ``key``) need one. Given one
(``--passphrase-file``, ``$MAILSYNC_PASSPHRASE``), it seals the whole
batch, stretched by scrypt once (:class:`mailsync.enroll.Sealer`). Else
each station gets its own, made up (~148 random bits), written to an
owner-only list ``DIR-passphrases.csv`` *beside* the bundle folder, not in
it: the folder can go to the stores one way (a file share, a USB stick)
while the list stays with the admin and each passphrase goes another way
(a phone call), and one leaked passphrase opens one store's bundle, not
10,000. (A made-up passphrase needs no stretching: it is cheap to seal
with, :data:`mailsync.enroll.MADE_UP_SCRYPT_N`.)
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from mailsync import capture, standing, trust
from mailsync import link as links_mod
from mailsync.admin import Site
from mailsync.enroll import MADE_UP_SCRYPT_N, Bundle, Sealer, new_passphrase, write_bundle
from mailsync.errors import ConfigError, DatabaseError, first_line
from mailsync.keys import KeyPair, PublicKey
from mailsync.station_csv import StationListError, StationRow, check_against, read_stations
from mailsync.store.tables import farewells, now, peer_keys, stations

#: the staging folder's name starts so (inside the bundle folder)
STAGING_PREFIX = ".mailsync-enroll-"


@dataclass(frozen=True)
class Enrollment:
    """What a bulk enrollment did (or, with ``dry_run``, would do)."""

    stations: int
    sealed: int  # bundles holding the station's private keys
    bundles: Path
    passphrases: Path | None  # the list of made-up passphrases, when one is written
    dry_run: bool = False


def default_bundles(csv_path: Path) -> Path:
    """``stores.csv`` → ``stores-bundles`` beside it."""
    return csv_path.with_name(f"{csv_path.stem}-bundles")


def passphrase_list(bundles: Path) -> Path:
    """Beside the bundle folder, not in it (see the module's docstring)."""
    return bundles.with_name(f"{bundles.name}-passphrases.csv")


def add_stations(
    site: Site,
    csv_path: Path,
    *,
    bundles: Path | None = None,
    passphrase: str | None = None,
    dry_run: bool = False,
) -> Enrollment:
    """Add every station of ``csv_path`` and write a bundle for each into
    ``bundles`` (default: ``default_bundles``): all or none. With
    ``passphrase``, sealed bundles share it; else each gets its own, listed
    in ``passphrase_list(bundles)``. ``dry_run`` checks everything and
    changes nothing."""
    if site.config.role != "host":
        raise ConfigError(
            f"stations are defined on the host; {site.config.node_id!r} is a remote "
            "(it receives its rules from the host)"
        )
    rows = read_stations(csv_path)
    with site.engine.connect() as conn:
        known = {r.id: r.email for r in conn.execute(select(stations.c.id, stations.c.email))}
        current = select(peer_keys.c.key_id, peer_keys.c.peer).where(
            peer_keys.c.replaced_at.is_(None)
        )
        keys = {r.key_id: r.peer for r in conn.execute(current)}
    problems = check_against(
        csv_path,
        rows,
        host_id=site.config.node_id,
        host_key=site.ring.current.public.key_id,
        host_address=site.config.mailbox.address,
        stations=known,
        keys=keys,
    )
    if problems:
        raise StationListError(str(csv_path), problems)
    # absolute and normal: `--bundles .` or `out/..` names a folder too
    folder = Path(os.path.abspath(bundles if bundles is not None else default_bundles(csv_path)))
    if not folder.name:
        raise ConfigError(f"{folder} cannot hold the bundles: name a folder below it")
    sealed = sum(1 for r in rows if r.key is None)
    listed = passphrase_list(folder) if sealed and passphrase is None else None
    _check_targets(folder, rows, listed)
    result = Enrollment(len(rows), sealed, folder, listed, dry_run)
    if dry_run:
        return result
    made = {r.id: KeyPair.generate() for r in rows if r.key is None}
    with _staging(folder, listed) as stage:
        _write_bundles(site, stage.path, rows, made, passphrase, listed and stage.listed)
        stage.sync()
        stage.committing = True
        _commit(site, csv_path, folder, stage.path, rows, made)
        stage.committed = True
        stage.publish(folder, [f"{r.id}.bundle" for r in rows], listed)
    return result


# ------------------------------------------------------------------- files


def _check_targets(folder: Path, rows: Sequence[StationRow], listed: Path | None) -> None:
    """Refuse before any change: a bundle or the passphrase list there
    already (never overwritten), a bundle folder that is a file or whose
    parent is missing."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: cannot write the bundles into it")
    if not folder.exists() and not folder.parent.is_dir():
        raise ConfigError(f"cannot make the bundle folder {folder}: {folder.parent} is no folder")
    # lexists: a dangling symbolic link is in the way too (it is not followed)
    taken = [folder / f"{r.id}.bundle" for r in rows if os.path.lexists(folder / f"{r.id}.bundle")]
    if listed is not None and os.path.lexists(listed):
        taken.insert(0, listed)
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise ConfigError(
            f"{taken[0]} exists already{more}: no station added, nothing overwritten",
            hint="remove those files or pass another --bundles DIR",
        )


@dataclass
class _Stage:
    path: Path  # the staging folder, inside the bundle folder
    listed: Path | None  # the staged passphrase list, beside its final place
    committing: bool = False  # the transaction began: a failure may come after its commit
    committed: bool = False

    def sync(self) -> None:
        """The staged names on the disk too (the files' data already is)."""
        for where in (self.path, self.listed.parent if self.listed else None):
            if where is not None:
                _fsync_dir(where)

    def publish(self, folder: Path, names: list[str], listed: Path | None) -> None:
        """Put the staged files in place, never replacing one; what could
        not be moved stays staged and is named in the error."""
        stuck: list[str] = []
        for name in names:
            if not _move(self.path / name, folder / name):
                stuck.append(name)
        if listed is not None and self.listed is not None and not _move(self.listed, listed):
            stuck.append(str(listed))
        _fsync_dir(folder)
        if stuck:
            raise ConfigError(
                f"the stations were added, but {len(stuck)} file(s) could not be put in place "
                f"(first: {stuck[0]}): they are in {self.path}",
                hint=f"move them by hand; the bundles hold the stations' keys: keep {self.path}",
            )
        self.path.rmdir()


def _move(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
        source.unlink()
    except OSError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staging(folder: Path, listed: Path | None) -> Iterator[_Stage]:
    """A staging folder (owner-only) in the bundle folder, made first; on a
    failure before the commit it goes (and the bundle folder, if made
    here), after the commit — or when it cannot be told whether the commit
    happened — it stays: the bundles in it hold keys."""
    made_folder = not folder.exists()
    try:
        if made_folder:
            folder.mkdir(mode=0o700)
        stage = _Stage(Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder)), None)
    except OSError as exc:
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(
            f"cannot write bundles into {folder}: {exc.strerror}: no station added"
        ) from None
    try:
        if listed is not None:
            fd, name = tempfile.mkstemp(prefix=f".{listed.name}.", dir=listed.parent)
            os.close(fd)
            stage.listed = Path(name)
        yield stage
    except BaseException as exc:
        # a DatabaseError from the commit means it was undone; anything else
        # once it began (a Ctrl-C) may have come after it: keep the bundles
        if not stage.committed and (not stage.committing or isinstance(exc, DatabaseError)):
            shutil.rmtree(stage.path, ignore_errors=True)
            if stage.listed is not None:
                stage.listed.unlink(missing_ok=True)
            if made_folder:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"cannot write the bundles into {folder}: {exc.strerror}: no station added"
                ) from None
        raise


def _write_bundles(
    site: Site,
    stage: Path,
    rows: Sequence[StationRow],
    made: dict[str, KeyPair],
    passphrase: str | None,
    listed: Path | None,
) -> None:
    """Every bundle into the staging folder, and the made-up passphrases
    (``id,email,bundle,passphrase``) into ``listed``; all on the disk."""
    host_key = site.ring.current.public
    shared = Sealer.derive(passphrase) if passphrase and made else None
    table = io.StringIO()
    out = csv.writer(table, lineterminator="\n")
    out.writerow(["id", "email", "bundle", "passphrase"])
    for row in rows:
        bundle = Bundle(
            host_id=site.config.node_id,
            host_address=site.config.mailbox.address,
            host_key=host_key,
            station_id=row.id,
            station_address=row.email,
            station_keys=made.get(row.id),
        )
        sealer = shared
        if row.id in made and sealer is None:
            own = new_passphrase()
            sealer = Sealer.derive(own, n=MADE_UP_SCRYPT_N)
            out.writerow([row.id, row.email, f"{row.id}.bundle", own])
        write_bundle(stage / f"{row.id}.bundle", bundle, sealer, durable=False)
    if listed is not None:
        fd = os.open(listed, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(table.getvalue())
    # one sync(2) for the batch, which returns once the data is written
    # (Linux): an fsync per file took 25 s of 39 for 10,000 bundles here
    os.sync()


# ---------------------------------------------------------------- database


def _commit(
    site: Site,
    csv_path: Path,
    folder: Path,
    stage: Path,
    rows: Sequence[StationRow],
    made: dict[str, KeyPair],
) -> None:
    """Every station, link, key and log line in one transaction."""
    keys: list[tuple[str, PublicKey]] = [
        (r.id, made[r.id].public if r.key is None else r.key) for r in rows
    ]
    source = csv_path.name
    each = [
        (peer, f"station {peer} <{r.email}> added, key {key.key_id} (from {source})")
        for r, (peer, key) in zip(rows, keys, strict=True)
    ]
    try:
        with site.engine.begin() as conn:
            at = now()
            conn.execute(
                stations.insert(),
                [{"id": r.id, "label": r.label, "email": r.email, "created_at": at} for r in rows],
            )
            cursor = conn.execute(select(func.coalesce(func.max(capture.changes.c.id), 0))).scalar()
            links_mod.create_many(
                conn,
                [(r.id, r.email) for r in rows],
                change_cursor=int(cursor or 0),
                key_told=site.ring.current.public.key_id,
            )
            _trust(conn, keys, at)
            _forget_farewells(conn, [r.id for r in rows])
            site.journal.info(
                "station",
                f"{len(rows)} stations added from {source} ({len(made)} with keys made "
                f"here); bundles in {folder} (staged in {stage.name} until this commit)",
                conn=conn,
            )
            site.journal.info_many("station", each, conn=conn)
    except SQLAlchemyError as exc:
        # another admin added one of these stations since the check, or the
        # database went away: the transaction is undone
        raise DatabaseError(
            f"the stations of {csv_path} could not be added ({first_line(exc)}): "
            "no station added, no bundle written",
            hint="run the command again: its check names what is in the way",
        ) from exc


def _trust(conn: Connection, keys: Sequence[tuple[str, PublicKey]], at: object) -> None:
    """The stations' keys as current: one executemany for the new peers; a
    peer with keys on record (a removed station's id, added again) through
    :func:`mailsync.trust.trust_key`, which replaces its old key."""
    ids = {peer for peer, _ in keys}
    known = {p for p in conn.execute(select(peer_keys.c.peer).distinct()).scalars() if p in ids}
    fresh = [
        {"peer": peer, "key_id": key.key_id, "public": key.token(), "added_at": at}
        for peer, key in keys
        if peer not in known
    ]
    if fresh:
        conn.execute(peer_keys.insert(), fresh)
    for peer, key in keys:
        if peer in known:
            trust.trust_key(conn, peer, key)


def _forget_farewells(conn: Connection, ids: list[str]) -> None:
    """Stations added under removed ones' ids are no longer removed
    (:func:`mailsync.standing.forget_farewell`, for the few it concerns)."""
    wanted = set(ids)
    for peer in [p for p in conn.execute(select(farewells.c.peer)).scalars() if p in wanted]:
        standing.forget_farewell(conn, peer)
