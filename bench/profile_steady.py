"""Where a steady-state cycle's CPU goes: the profile behind issue 17's
steady-state figure (docs/benchmarks.md, section 10).

The site of ``bench/pipeline.py`` section 2 (the sample data, a host and
one station on SQLite over Maildir, the initial load taken), then N
changesets of 50 changed invoice lines, each a host cycle and a station
cycle, under :mod:`cProfile`. Each function's own time (``tottime``) is
put in the bucket of the code it belongs to: SQLAlchemy, the database
driver (``sqlite3``'s C methods: execute, commit, fetch), cryptography,
zstd, msgpack, the ``email`` package, mailsync's own code, the rest of the
standard library. Against the floor of section 2 (``executemany`` with a
commit per changeset) this says what a changeset costs beyond the
database's own work, and which library it is spent in.

    python bench/profile_steady.py [--changesets N] [--quick] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from cycle_cost import merge
from pipeline import ROWS_PER_CHANGESET, Site, _changed_lines, _commit, machine
from sqlalchemy import update
from streaming_memory import run_child

from mailsync.node import Node
from mailsync.tools import samples

BEGIN = "<!-- bench/profile_steady.py: begin -->"
END = "<!-- bench/profile_steady.py: end -->"

#: (bucket, test on a profile entry's file name), first match wins.
BUCKETS: list[tuple[str, str]] = [
    ("SQLAlchemy (building, caching, compiling, executing, result rows)", "/sqlalchemy/"),
    ("cryptography (X25519, ChaCha20-Poly1305, Ed25519)", "/cryptography/"),
    ("zstd", "zstandard"),
    ("msgpack", "msgpack"),
    ("email (MIME headers, parsing)", "/email/"),
    ("mailsync's own code", "/mailsync/"),
]


def bucket_of(filename: str, name: str) -> str:
    if filename == "~":  # a C function: named by its type, where it has one
        if "sqlite3" in name:
            return "database driver (sqlite3: execute, commit, fetch)"
        for bucket, mark in (
            (BUCKETS[1][0], "_rust"),
            (BUCKETS[1][0], "openssl"),
            (BUCKETS[2][0], "zstd"),
            (BUCKETS[3][0], "msgpack"),
        ):
            if mark in name.lower():
                return bucket
        return "builtins (str, bytes, dict, hashing, file I/O …)"
    for bucket, mark in BUCKETS:
        if mark in filename:
            return bucket
    return "rest of the standard library"


def profile(changesets: int, invoices: int) -> tuple[dict[str, float], float, int]:
    """Buckets of own CPU seconds, the total, and the changesets profiled."""
    lines = samples.metadata.tables["invoice_lines"]
    with tempfile.TemporaryDirectory(prefix="mailsync-profile-") as tmp:
        site = Site(Path(tmp), invoices)
        run_child(site.config("hq"))
        run_child(site.config("koeln"))
        with Node.open(site.config("hq")) as hq, Node.open(site.config("koeln")) as koeln:
            hq.sync()
            koeln.sync()
            profiler = cProfile.Profile(time.process_time)
            for step in range(changesets):
                ids = _changed_lines(hq.engine, step)
                with hq.engine.begin() as conn:
                    conn.execute(
                        update(lines)
                        .where(lines.c.id.in_(ids))
                        .values(quantity=lines.c.quantity + 1)
                    )
                profiler.enable()
                hq.sync()
                report = koeln.sync()
                profiler.disable()
                if report.rows_applied != ROWS_PER_CHANGESET or report.errors:
                    raise SystemExit(f"changeset {step}: {report.errors or report.rows_applied}")
    stats = pstats.Stats(profiler)
    buckets: dict[str, float] = {}
    total = 0.0
    for (filename, _line, name), (_cc, _nc, own, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = bucket_of(filename, name)
        buckets[key] = buckets.get(key, 0.0) + own
        total += own
    return buckets, total, changesets


def markdown(buckets: dict[str, float], total: float, changesets: int) -> str:
    rows = sorted(buckets.items(), key=lambda kv: -kv[1])
    out = [
        f"Section 10 written by `bench/profile_steady.py` at commit {_commit()}; machine: "
        f"{machine()}. How it is taken: its docstring. Profiling slows Python code, not C "
        "code: the shares are what matters, not the milliseconds.",
        "",
        "### 10. Where a steady-state changeset's CPU goes (cProfile, own time)",
        "",
        f"{changesets} changesets of {ROWS_PER_CHANGESET} changed invoice lines, each a host "
        f"cycle and a station cycle (SQLite both ends, Maildir): "
        f"{1000 * total / changesets:.1f} ms of profiled CPU per changeset.",
        "",
        "| where | ms per changeset | share |",
        "|---|---|---|",
    ]
    for key, seconds in rows:
        out.append(f"| {key} | {1000 * seconds / changesets:.1f} | {seconds / total:.0%} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--changesets", type=int, default=None)
    parser.add_argument("--output", type=Path, help="merge the section into this markdown file")
    args = parser.parse_args()
    changesets = args.changesets or (5 if args.quick else 200)
    invoices = 2_000 if args.quick else 30_000
    buckets, total, n = profile(changesets, invoices)
    block = markdown(buckets, total, n)
    print(block)
    if args.output:
        merge(args.output, block, BEGIN, END)


if __name__ == "__main__":
    main()
