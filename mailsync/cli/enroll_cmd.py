"""``mailsync station add --csv FILE``: many stations at once (the library
function is :func:`mailsync.bulk_enroll.add_stations`; this module parses,
calls it once and prints)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mailsync.cli.common import console, escape, open_node
from mailsync.enroll import passphrase_from


def add_from_csv(
    ctx: typer.Context,
    csv_path: Path,
    bundles: Path | None,
    passphrase_file: Path | None,
    dry_run: bool,
) -> None:
    """Every station of ``csv_path``, or none; each problem of the file on
    its own line (stderr) before the one ``error:`` line."""
    from mailsync import bulk_enroll
    from mailsync.station_csv import SHOWN_PROBLEMS, StationListError

    passphrase = passphrase_from(passphrase_file)
    with open_node(ctx) as node:
        try:
            done = bulk_enroll.add_stations(
                node, csv_path, bundles=bundles, passphrase=passphrase, dry_run=dry_run
            )
        except StationListError as exc:
            if len(exc.problems) > 1:
                for problem in exc.problems[:SHOWN_PROBLEMS]:
                    print(f"  {problem}", file=sys.stderr)
                if len(exc.problems) > SHOWN_PROBLEMS:
                    print(f"  … and {len(exc.problems) - SHOWN_PROBLEMS} more", file=sys.stderr)
            raise
    made = f" ({done.sealed} with keys made here)" if done.sealed else ""
    count = f"{done.stations} station{'s' if done.stations != 1 else ''}"
    folder = escape(str(done.bundles))
    if done.dry_run:
        console.print(
            f"{escape(str(csv_path))}: {count} can be added{made}; "
            f"bundles would go to {folder} (--dry-run: nothing added, nothing written)"
        )
        return
    console.print(f"{count} added from {escape(str(csv_path))}{made}")
    console.print(f"bundles in {folder}: one per station, ID.bundle")
    if done.passphrases is not None:
        console.print(
            f"passphrases in {escape(str(done.passphrases))} (owner-only): give each to its "
            "station by another channel than its bundle, then delete the list"
        )
    elif done.sealed:
        console.print("sealed bundles: with the passphrase given")
    console.print("on each station: `mailsync join ID.bundle`")
