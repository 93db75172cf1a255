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

import zstandard
from sqlalchemy import select, update

sys.path.insert(0, str(Path(__file__).parent))
from streaming_memory import setup

from mailsync.node import Node
from mailsync.tools import samples
from mailsync.wire.envelope import _PREFIX, _SIG, _TAG, read_header
from mailsync.wire.message import extract_envelope

ROWS = 50


def messages(box: Path) -> list[bytes]:
    files = [p for p in box.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]
    return [p.read_bytes() for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]


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
            bodies = []
            split = {"message": [], "mail": [], "base64": [], "clear": [], "tag+sig": [], "body": []}
            for raw in raws:
                env = extract_envelope(raw, "m")
                header = read_header(env, "m")
                if header.seq == 0:
                    continue
                clear = _PREFIX.size + int(_PREFIX.unpack_from(env)[2])
                b64 = len(base64.encodebytes(env).replace(b"\n", b"\r\n"))
                _, body = hq_dec = koeln.codec.decrypt(env, "m", koeln.ring, koeln_keys(koeln))
                del hq_dec
                split["message"].append(len(raw))
                split["mail"].append(len(raw) - b64)
                split["base64"].append(b64 - len(env))
                split["clear"].append(clear)
                split["tag+sig"].append(_TAG + _SIG)
                split["body"].append(len(body))
                bodies.append(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read())
    n = len(bodies)
    per = {k: statistics.mean(v) for k, v in split.items()}
    print(f"{n} changeset messages of {ROWS} rows; CSV + zstd -19: "
          f"{csv_bytes / (args.changesets * ROWS):.1f} bytes/row")
    print("| part of a message | bytes | per row | share |")
    print("|---|---|---|---|")
    for key in ("mail", "base64", "clear", "tag+sig", "body"):
        print(f"| {key} | {per[key]:,.0f} | {per[key] / ROWS:.1f} | {per[key] / per['message']:.0%} |")
    print(f"| whole message | {per['message']:,.0f} | {per['message'] / ROWS:.1f} | |")
    raw_mean = statistics.mean(len(b) for b in bodies)
    print(f"\nraw changeset {raw_mean:,.0f} bytes ({raw_mean / ROWS:.1f}/row)")
    train, test = bodies[: n // 2], bodies[n // 2 :]
    for level in (3, 19):
        c = zstandard.ZstdCompressor(level=level)
        m = statistics.mean(len(c.compress(b)) for b in test)
        print(f"zstd -{level}, no dictionary: {m:,.0f} bytes ({m / ROWS:.1f}/row)")
    for size in (8192, 16384, 32768):
        try:
            d = zstandard.train_dictionary(size, train)
        except zstandard.ZstdError as exc:
            print(f"dictionary {size}: {exc}")
            continue
        for level in (3, 9, 19):
            c = zstandard.ZstdCompressor(level=level, dict_data=d)
            m = statistics.mean(len(c.compress(b)) for b in test)
            print(f"dictionary {len(d.as_bytes()):,} B trained on {len(train)}, zstd -{level}: "
                  f"{m:,.0f} bytes ({m / ROWS:.1f}/row)")


def koeln_keys(node: Node):  # type: ignore[no-untyped-def]
    with node.engine.connect() as conn:
        return node.cycle.sender_keys(conn, "hq")


if __name__ == "__main__":
    main()
