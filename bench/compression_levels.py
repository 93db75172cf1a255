"""Which zstd level should changesets use? Size against time on the sample data.

Builds the initial-load changeset of the sample invoicing tables (what a new
station receives) and a steady-state-sized one (50 changed invoice lines),
then compresses each at several zstd levels. Figures are medians of
``--repeat`` runs; the ratio is raw bytes / compressed bytes.

    python bench/compression_levels.py [--customers 20000 --invoices 60000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import zstandard
from sqlalchemy import select

from mailsync.build import type_name
from mailsync.store.engine import open_engine
from mailsync.store.reflection import reflect
from mailsync.tools import samples
from mailsync.wire.changeset import ChangesetWriter

LEVELS = (1, 3, 6, 9, 12, 19)


def changeset(engine_url: str, limit: int | None) -> bytes:
    engine = open_engine(engine_url)
    buf = io.BytesIO()
    writer = ChangesetWriter(buf)
    with engine.connect() as conn:
        for name in samples.TABLES if limit is None else ("invoice_lines",):
            table = reflect(conn, name)
            tdef = writer.table(
                name,
                [(c.name, type_name(c, engine)) for c in table.columns],
                [c.name for c in table.primary_key.columns],
            )
            query = select(*table.columns).order_by(*table.primary_key.columns)
            if limit is not None:
                query = query.limit(limit)
            result = conn.execute(query, execution_options={"yield_per": 5000})
            for part in result.partitions():
                writer.rows(tdef, "U", [tuple(r) for r in part])
    writer.close()
    engine.dispose()
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--invoices", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = open_engine(url)
        samples.create_schema(engine)
        counts = samples.generate(engine, customers=args.customers, invoices=args.invoices)
        engine.dispose()
        cases = {"initial load": changeset(url, None), "50 changed lines": changeset(url, 50)}
    print(f"sample data: {counts}")
    print("| changeset | raw bytes | level | compressed | ratio | compress MB/s | ms |")
    print("|---|---|---|---|---|---|---|")
    for label, raw in cases.items():
        for level in LEVELS:
            comp = zstandard.ZstdCompressor(level=level)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                out = comp.compress(raw)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(
                f"| {label} | {len(raw):,} | {level} | {len(out):,} | {len(raw) / len(out):.1f} "
                f"| {len(raw) / t / 1e6:.0f} | {t * 1000:.2f} |"
            )


if __name__ == "__main__":
    main()
