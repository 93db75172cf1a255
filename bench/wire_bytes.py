"""Where the wire bytes of a small changeset go (issue 17, item 5).

A host with the sample data and one station over a ``maildir:`` post office;
after the initial load, ``--changesets`` changesets of 50 changed invoice
lines go down. Every message in the station's mailbox is cut apart: mail
headers and text part, base64 inflation, the envelope's clear header, AEAD
tag and signature, and the compressed body; the body is then decompressed
and compressed again with zstd -19, and with a dictionary trained on the
first half of the bodies (tested on the second half) at several levels —
what a per-link dictionary could save. The floor is the same rows as CSV
compressed with zstd -19 (``bench/pipeline.py`` section 3).

    python bench/wire_bytes.py [--invoices 2000] [--changesets 60]

Messages are reported in two groups: before the link's dictionary was in
use (the first ``dictionary_samples`` + 2 changesets or so) and after.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy import select, update

sys.path.insert(0, str(Path(__file__).parent))
from streaming_memory import setup

from mailsync.node import Node
from mailsync.tools import samples
from mailsync.wire.envelope import _PREFIX, _SIG, _TAG, read_header
from mailsync.wire.message import extract_envelope

ROWS = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--invoices", type=int, default=2_000)
    parser.add_argument("--changesets", type=int, default=60)
    args = parser.parse_args()
    lines = samples.metadata.tables["invoice_lines"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, args.invoices, 10_000_000)
        hq_cfg, st_cfg = root / "hq" / "mailsync.toml", root / "koeln" / "mailsync.toml"
        csv_bytes = 0
        floor = zstandard.ZstdCompressor(level=19)
        with Node.open(hq_cfg) as hq, Node.open(st_cfg) as koeln:
            hq.sync()
            koeln.sync()
            hq.sync()
            box = root / "mail" / "koeln@bench.test"
            seen = {p.name for p in box.rglob("*")}
            for step in range(args.changesets):
                ids = list(range(1 + step * ROWS, 1 + (step + 1) * ROWS))
                with hq.engine.begin() as conn:
                    conn.execute(
                        update(lines)
                        .where(lines.c.id.in_(ids))
                        .values(quantity=lines.c.quantity + 1)
                    )
                    rows = conn.execute(select(lines).where(lines.c.id.in_(ids))).all()
                buf = io.StringIO()
                csv.writer(buf).writerows(rows)
                csv_bytes += len(floor.compress(buf.getvalue().encode()))
                hq.sync()
                koeln.sync()
            hq.sync()
            raws = [
                p.read_bytes()
                for p in sorted(box.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
                if p.is_file() and p.parent.name in ("new", "cur") and p.name not in seen
            ]
            groups: dict[bool, dict[str, list[int]]] = {True: {}, False: {}}
            bodies = []
            for raw in raws:
                env = extract_envelope(raw, "m")
                header = read_header(env, "m")
                if header.seq == 0:
                    continue
                clear = _PREFIX.size + int(_PREFIX.unpack_from(env)[2])
                b64 = len(base64.encodebytes(env).replace(b"\n", b"\r\n"))
                _, body = koeln.codec.decrypt(env, "m", koeln.ring, koeln_keys(koeln))
                split = groups[bool(header.dictionary)]
                for key, value in (
                    ("message", len(raw)),
                    ("mail", len(raw) - b64),
                    ("base64", b64 - len(env)),
                    ("clear", clear),
                    ("tag+sig", _TAG + _SIG),
                    ("body", len(body)),
                ):
                    split.setdefault(key, []).append(value)
                stream = koeln.codec.stream([body], "m", header)
                bodies.append(stream.read())
    floor_row = csv_bytes / (args.changesets * ROWS)
    print(f"CSV + zstd -19 (the floor): {floor_row:.1f} bytes/row")
    for with_dict, split in groups.items():
        if not split:
            continue
        per = {k: statistics.mean(v) for k, v in split.items()}
        what = "with the link's dictionary" if with_dict else "without a dictionary"
        print(f"\n{len(split['message'])} changeset messages of {ROWS} rows, {what}:\n")
        print("| part of a message | bytes | per row | share |")
        print("|---|---|---|---|")
        for key in ("mail", "base64", "clear", "tag+sig", "body"):
            share = per[key] / per["message"]
            print(f"| {key} | {per[key]:,.0f} | {per[key] / ROWS:.1f} | {share:.0%} |")
        whole = per["message"] / ROWS
        ratio = whole / floor_row
        print(f"| whole message | {per['message']:,.0f} | {whole:.1f} | ÷ floor {ratio:.2f} |")
    n = len(bodies)
    raw_mean = statistics.mean(len(b) for b in bodies)
    print(f"\nraw changeset {raw_mean:,.0f} bytes ({raw_mean / ROWS:.1f}/row)")
    train, test = bodies[: n // 2], bodies[n // 2 :]
    for level in (3, 19):
        c = zstandard.ZstdCompressor(level=level)
        m = statistics.mean(len(c.compress(b)) for b in test)
        print(f"zstd -{level}, no dictionary: {m:,.0f} bytes ({m / ROWS:.1f}/row)")
    for size in (8192, 16384, 32768):
        try:
            d = zstandard.train_dictionary(size, list[Any](train))
        except zstandard.ZstdError as exc:
            print(f"dictionary {size}: {exc}")
            continue
        for level in (3, 9, 19):
            c = zstandard.ZstdCompressor(level=level, dict_data=d)
            m = statistics.mean(len(c.compress(b)) for b in test)
            print(
                f"dictionary {len(d.as_bytes()):,} B trained on {len(train)}, zstd -{level}: "
                f"{m:,.0f} bytes ({m / ROWS:.1f}/row)"
            )


def koeln_keys(node: Node) -> list[Any]:
    with node.engine.connect() as conn:
        return node.cycle.sender_keys(conn, "hq")


if __name__ == "__main__":
    main()
