"""``mailsync demo``: a host and two stations syncing the sample data.

Builds three nodes in one folder — ``hq`` with the generated sample
invoicing data, ``koeln`` and ``berlin`` with the empty schema — joined by a
local post office (``mail/``, one Maildir per address). It syncs the initial
loads (with each station's first blocks of the customer, invoice and line
number ranges), makes an edit on each node (a customer and an invoice that a
station numbers from its own leases while offline, a price change and a
delete at the host, an e-mail change at the other station),
syncs again and compares every table's row count and checksum across the
three databases. Needs no server; leaves everything in the folder to look at.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from sqlalchemy import delete, func, select, update

from mailsync import admin
from mailsync.checksum import TableChecksum, table_checksum
from mailsync.errors import ConfigError
from mailsync.node import CycleReport, Node, init_node
from mailsync.ranges.draw import draw
from mailsync.ranges.model import RangeSpec, list_leases
from mailsync.store.engine import open_engine
from mailsync.tools import samples

MARKER = ".mailsync-demo"
#: Number ranges for keys and numbers made on stations: first, last, block.
DEMO_RANGES = {
    "customer": (100_000, 199_999, 50),
    "invoice": (100_000, 199_999, 50),
    "invoice_line": (1_000_000, 1_999_999, 200),
}
NODES = ("hq", "koeln", "berlin")
DOMAIN = "demo.example"


@dataclass
class DemoResult:
    directory: Path
    checksums: dict[str, dict[str, TableChecksum]] = field(default_factory=dict)

    @property
    def agree(self) -> bool:
        per_node = list(self.checksums.values())
        return all(node == per_node[0] for node in per_node[1:])


def prepare_directory(directory: Path) -> None:
    """Create the demo folder; refuse one that holds anything but an old demo."""
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError(f"{directory} exists and is not a folder")
        if any(directory.iterdir()):
            if not (directory / MARKER).exists():
                raise ConfigError(
                    f"{directory} is not empty and holds no earlier demo; "
                    "mailsync demo will not touch it",
                    hint="name a new or empty folder: `mailsync demo DIR`",
                )
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("created by `mailsync demo`; safe to delete\n")


def run_demo(
    directory: Path,
    say: Callable[[str], None] = print,
    *,
    customers: int = 200,
    invoices: int = 600,
) -> DemoResult:
    prepare_directory(directory)
    directory = directory.resolve()
    for name in NODES:
        (directory / name).mkdir()
        engine = open_engine(f"sqlite:///{directory / name / (name + '.db')}")
        samples.create_schema(engine)
        if name == "hq":
            counts = samples.generate(engine, customers=customers, invoices=invoices, seed=1)
            say("hq: sample data " + ", ".join(f"{n} {t}" for t, n in counts.items()))
        engine.dispose()
        init_node(
            directory / name / "mailsync.toml",
            role="host" if name == "hq" else "remote",
            node_id=name,
            database=f"sqlite:///{name}.db",
            address=f"{name}@{DOMAIN}",
            mail="maildir:../mail",
        )
    nodes = {name: Node.open(directory / name / "mailsync.toml") for name in NODES}
    try:
        hq = nodes["hq"]
        for name, label in (("koeln", "Filiale Köln"), ("berlin", "Filiale Berlin")):
            # enrollment, first way: the station made its keys, the host
            # learns its public key and the station the host's (a bundle)
            _, bundle = hq.add_station(name, f"{name}@{DOMAIN}", label, key=nodes[name].public_key)
            nodes[name].join(bundle)
        say(
            f"hq: key {hq.public_key.key_id}; stations koeln "
            f"(key {nodes['koeln'].public_key.key_id}) and berlin "
            f"(key {nodes['berlin'].public_key.key_id}) enrolled"
        )
        hq.add_rule("customers", down="IUD", up="IU")
        hq.add_rule("articles", down="IUD", up="")
        hq.add_rule("invoices", down="IUD", up="I")
        hq.add_rule("invoice_lines", down="IUD", up="I")
        say("hq: rules for customers, articles, invoices, invoice_lines")
        for name, (first, last, block) in DEMO_RANGES.items():
            admin.add_range(hq, RangeSpec(name, first, last, block))
        say(
            "hq: number ranges "
            + ", ".join(f"{n} {a}-{b} (blocks of {k})" for n, (a, b, k) in DEMO_RANGES.items())
        )

        def sync(name: str) -> CycleReport:
            report = nodes[name].sync()
            raw = sum(b.raw_size for b in report.built)
            sealed = sum(b.size for b in report.built)
            size = f" ({raw:,} bytes raw → {sealed:,} sealed)" if report.built else ""
            say(
                f"sync {name:<6}: received {report.received}, applied {report.rows_applied} rows, "
                f"sent {report.sent} message(s) with {report.rows_sent} rows{size}"
            )
            return report

        for name in NODES:
            sync(name)
        _edit(nodes, say)
        for name in ("koeln", "berlin", "hq", "koeln", "berlin"):
            sync(name)
        result = DemoResult(directory)
        for name, node in nodes.items():
            with node.engine.connect() as conn:
                result.checksums[name] = {t: table_checksum(conn, t) for t in samples.TABLES}
        return result
    finally:
        for node in nodes.values():
            node.close()


def _edit(nodes: dict[str, Node], say: Callable[[str], None]) -> None:
    cust = samples.metadata.tables["customers"]
    art = samples.metadata.tables["articles"]
    lines = samples.metadata.tables["invoice_lines"]
    inv = samples.metadata.tables["invoices"]
    with nodes["koeln"].engine.begin() as conn:  # offline: numbers from its own leases
        row = conn.execute(select(cust).order_by(cust.c.id.desc()).limit(1)).mappings().one()
        customer = draw(conn, "customer")
        new = dict(row)
        new.update(
            id=customer,
            customer_no=f"K-{customer:06d}",
            name="Bäckerei Schäfer & Söhne",
            city="Köln",
            email="info@schaefer.example",
        )
        conn.execute(cust.insert().values(**new))
        invoice = draw(conn, "invoice")
        conn.execute(
            inv.insert().values(
                id=invoice,
                invoice_no=f"R-2026-{invoice:06d}",
                customer_id=customer,
                invoice_date=dt.date(2026, 11, 23),
                due_date=dt.date(2026, 12, 7),
                currency="EUR",
                status="open",
                total=Decimal("59.50"),
            )
        )
        article = conn.execute(select(art).order_by(art.c.id).limit(1)).mappings().one()
        for line_no in (1, 2):
            conn.execute(
                lines.insert().values(
                    id=draw(conn, "invoice_line"),
                    invoice_id=invoice,
                    line_no=line_no,
                    article_id=article["id"],
                    description=article["name"],
                    quantity=Decimal("1.000"),
                    unit_price=article["unit_price"],
                    discount_pct=Decimal("0.00"),
                    line_total=article["unit_price"],
                )
            )
        (lease,) = [x for x in list_leases(conn, "customer") if x.holder == "koeln" and x.left]
    say(
        f"koeln (offline): customer K-{customer:06d} 'Bäckerei Schäfer & Söhne' and invoice "
        f"R-2026-{invoice:06d} with 2 lines, numbered from its own leases "
        f"(customers {lease.first}-{lease.last})"
    )
    with nodes["hq"].engine.begin() as conn:
        conn.execute(
            update(art).where(art.c.id == 1).values(unit_price=art.c.unit_price * Decimal("1.05"))
        )
        last = conn.execute(select(func.max(lines.c.id))).scalar_one()
        conn.execute(delete(lines).where(lines.c.id == last))
    say(f"hq: article 1 price +5 %, invoice line {last} deleted")
    with nodes["berlin"].engine.begin() as conn:
        conn.execute(update(cust).where(cust.c.id == 2).values(email="einkauf@berlin.example"))
    say("berlin: customer 2 has a new e-mail address")
