"""The sample invoicing database used by the demo, the tests and the benchmarks.

Four tables in dependency order — customers, articles, invoices, invoice
lines — whose columns exercise what business tables hold: integer keys,
Decimal money with exact scale, dates and datetimes, booleans, floats, bytes
and Unicode names from several European languages. :func:`generate` fills
them deterministically for a seed, in chunks, so a million invoice lines
never sit in memory at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Unicode,
    func,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from mailsync.wire.changeset import batches

metadata = MetaData()

customers = Table(
    "customers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("customer_no", String(20), unique=True),
    Column("name", Unicode(200), nullable=False),
    Column("street", Unicode(200)),
    Column("postcode", String(10)),
    Column("city", Unicode(100)),
    Column("country", String(2)),
    Column("email", String(200)),
    Column("credit_limit", Numeric(12, 2)),
    Column("created_at", DateTime),
    Column("active", Boolean),
    Column("notes", Text),
)

articles = Table(
    "articles",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sku", String(40), unique=True, nullable=False),
    Column("name", Unicode(200), nullable=False),
    Column("unit", String(10)),
    Column("unit_price", Numeric(12, 2), nullable=False),
    Column("vat_rate", Numeric(5, 2), nullable=False),
    Column("weight_kg", Float),
    Column("image", LargeBinary),
    Column("updated_at", DateTime),
)

invoices = Table(
    "invoices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("invoice_no", String(20), unique=True),
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=False),
    Column("invoice_date", Date, nullable=False),
    Column("due_date", Date),
    Column("currency", String(3), nullable=False),
    Column("status", String(12), nullable=False),
    Column("total", Numeric(14, 2), nullable=False),
    Column("created_at", DateTime),
)

invoice_lines = Table(
    "invoice_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("invoice_id", Integer, ForeignKey("invoices.id"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("article_id", Integer, ForeignKey("articles.id"), nullable=False),
    Column("description", Unicode(200)),
    Column("quantity", Numeric(12, 3), nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
    Column("discount_pct", Numeric(5, 2), nullable=False),
    Column("line_total", Numeric(14, 2), nullable=False),
    Column("created_at", DateTime),
    Column("updated_at", DateTime),
)

#: The sample tables, parents before children.
TABLES: tuple[str, ...] = ("customers", "articles", "invoices", "invoice_lines")

CHUNK = 10_000
BASE_TIME = dt.datetime(2026, 1, 5, 8, 0, 0)
CENT = Decimal("0.01")

_FIRST = [
    "Müller",
    "Schäfer",
    "Łukasz",
    "Dvořák",
    "Ærø",
    "Ødegård",
    "François",
    "Nuñez",
    "Weiß",
    "Kovač",
    "Żak",
    "Öztürk",
    "Sørensen",
    "Gómez",
    "Brontë",
    "Þórsson",
]
_KIND = ["GmbH", "& Söhne", "KG", "S.à r.l.", "sp. z o.o.", "s.r.o.", "AG", "e.K.", "ApS", "S.L."]
_CITIES = [
    ("Köln", "DE", "50667"),
    ("Berlin", "DE", "10115"),
    ("Łódź", "PL", "90-001"),
    ("Brno", "CZ", "602 00"),
    ("Ærøskøbing", "DK", "5970"),
    ("Besançon", "FR", "25000"),
    ("Graz", "AT", "8010"),
    ("Zürich", "CH", "8001"),
    ("A Coruña", "ES", "15001"),
]
_STREETS = [
    "Hauptstraße",
    "Am Gänsemarkt",
    "ulica Piotrkowska",
    "Náměstí Svobody",
    "Rue de l'Église",
]
_GOODS = ["Schraube", "Dübel", "Kabel", "Lötzinn", "Zange", "Prüfgerät", "Kühlmittel", "Glühbirne"]
_UNITS = ["Stk", "m", "kg", "Pck", "l"]
_STATUS = ["open", "paid", "overdue", "cancelled"]


def create_schema(engine: Engine) -> None:
    """Create the four sample tables where missing."""
    metadata.create_all(engine, checkfirst=True)


def _customers(rng: random.Random, n: int) -> Iterator[dict[str, Any]]:
    for i in range(1, n + 1):
        city, country, postcode = rng.choice(_CITIES)
        yield {
            "id": i,
            "customer_no": f"K-{i:06d}",
            "name": f"{rng.choice(_FIRST)} {rng.choice(_KIND)}",
            "street": f"{rng.choice(_STREETS)} {rng.randint(1, 200)}",
            "postcode": postcode,
            "city": city,
            "country": country,
            "email": f"kunde{i}@example.com" if rng.random() < 0.8 else None,
            "credit_limit": Decimal(rng.randint(0, 5_000_000)) * CENT,
            "created_at": BASE_TIME + dt.timedelta(minutes=rng.randint(0, 500_000)),
            "active": rng.random() < 0.9,
            "notes": "Lieferung nur werktags – bitte klingeln" if rng.random() < 0.1 else None,
        }


def _articles(rng: random.Random, n: int) -> Iterator[dict[str, Any]]:
    for i in range(1, n + 1):
        yield {
            "id": i,
            "sku": f"ART-{i:05d}",
            "name": f"{rng.choice(_GOODS)} {rng.randint(1, 99)} mm",
            "unit": rng.choice(_UNITS),
            "unit_price": Decimal(rng.randint(5, 500_00)) * CENT,
            "vat_rate": rng.choice([Decimal("19.00"), Decimal("7.00"), Decimal("0.00")]),
            "weight_kg": round(rng.uniform(0.01, 25.0), 3) if rng.random() < 0.9 else None,
            "image": rng.randbytes(32) if rng.random() < 0.2 else None,
            "updated_at": BASE_TIME + dt.timedelta(minutes=rng.randint(0, 100_000)),
        }


def generate(
    engine: Engine,
    *,
    customers: int = 100,
    articles: int | None = None,
    invoices: int = 300,
    lines_per_invoice: tuple[int, int] = (1, 5),
    seed: int = 1,
) -> dict[str, int]:
    """Fill the (empty) sample tables deterministically; returns row counts."""
    n_articles = articles if articles is not None else max(20, customers // 10)
    if customers < 1 and invoices > 0:
        raise ValueError("invoices need at least one customer")
    rng = random.Random(seed)
    tables = metadata.tables
    counts = dict.fromkeys(TABLES, 0)
    with engine.begin() as conn:
        for batch in batches(_customers(rng, customers), CHUNK):
            conn.execute(tables["customers"].insert(), batch)
            counts["customers"] += len(batch)
        prices: list[Decimal] = []
        for batch in batches(_articles(rng, n_articles), CHUNK):
            conn.execute(tables["articles"].insert(), batch)
            prices.extend(r["unit_price"] for r in batch)
            counts["articles"] += len(batch)
        line_id = 0
        inv_batch: list[dict[str, Any]] = []
        line_batch: list[dict[str, Any]] = []
        for inv in range(1, invoices + 1):
            day = BASE_TIME.date() + dt.timedelta(days=rng.randint(0, 320))
            total = Decimal(0)
            for line_no in range(1, rng.randint(*lines_per_invoice) + 1):
                line_id += 1
                article = rng.randint(1, n_articles)
                qty = Decimal(rng.randint(1, 50_000)) / 1000
                price = prices[article - 1]
                discount = rng.choice([Decimal("0.00"), Decimal("2.00"), Decimal("5.00")])
                line_total = (qty * price * (100 - discount) / 100).quantize(CENT)
                total += line_total
                stamp = dt.datetime.combine(day, dt.time(8)) + dt.timedelta(
                    seconds=rng.randint(0, 36_000)
                )
                line_batch.append(
                    {
                        "id": line_id,
                        "invoice_id": inv,
                        "line_no": line_no,
                        "article_id": article,
                        "description": f"Pos. {line_no}: Artikel {article}",
                        "quantity": qty,
                        "unit_price": price,
                        "discount_pct": discount,
                        "line_total": line_total,
                        "created_at": stamp,
                        "updated_at": stamp,
                    }
                )
            inv_batch.append(
                {
                    "id": inv,
                    "invoice_no": f"R-2026-{inv:06d}",
                    "customer_id": rng.randint(1, customers),
                    "invoice_date": day,
                    "due_date": day + dt.timedelta(days=30),
                    "currency": "EUR",
                    "status": rng.choice(_STATUS),
                    "total": total.quantize(CENT),
                    "created_at": dt.datetime.combine(day, dt.time(7, 30)),
                }
            )
            if len(line_batch) >= CHUNK or len(inv_batch) >= CHUNK:
                counts["invoices"] += _flush(conn, tables["invoices"], inv_batch)
                counts["invoice_lines"] += _flush(conn, tables["invoice_lines"], line_batch)
        counts["invoices"] += _flush(conn, tables["invoices"], inv_batch)
        counts["invoice_lines"] += _flush(conn, tables["invoice_lines"], line_batch)
    return counts


def _flush(conn: Any, table: Table, batch: list[dict[str, Any]]) -> int:
    n = len(batch)
    if batch:
        conn.execute(table.insert(), batch)
        batch.clear()
    return n


def main(argv: list[str] | None = None) -> int:
    """``python samples/generate.py --db URL [--customers N] [--invoices N] [--seed N]``."""
    parser = argparse.ArgumentParser(description="Create and fill the sample invoicing database.")
    parser.add_argument("--db", required=True, help="SQLAlchemy URL, e.g. sqlite:///demo.db")
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--articles", type=int, default=None)
    parser.add_argument("--invoices", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    from mailsync.errors import MailsyncError, first_line
    from mailsync.store.engine import open_engine, redact

    try:
        engine = open_engine(args.db)
        create_schema(engine)
        with engine.connect() as conn:
            for name in TABLES:
                held = conn.execute(
                    select(func.count()).select_from(metadata.tables[name])
                ).scalar()
                if held:
                    print(
                        f"error: {name} already holds {held} rows in {redact(engine)}; "
                        "use an empty database",
                        file=sys.stderr,
                    )
                    return 2
        counts = generate(
            engine,
            customers=args.customers,
            articles=args.articles,
            invoices=args.invoices,
            seed=args.seed,
        )
    except MailsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: {redact(args.db)}: {first_line(exc)}", file=sys.stderr)
        return 2
    print(", ".join(f"{n} {t}" for t, n in counts.items()))
    return 0
