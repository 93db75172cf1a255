"""The sample invoicing data: deterministic, consistent, any size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from mailsync.checksum import table_checksum
from mailsync.store.engine import open_engine
from mailsync.tools import samples

ROOT = Path(__file__).resolve().parent.parent


def make(db_url: str, seed: int = 1) -> dict[str, str]:
    engine = open_engine(db_url)
    samples.create_schema(engine)
    counts = samples.generate(engine, customers=50, invoices=120, seed=seed)
    assert counts["customers"] == 50 and counts["invoices"] == 120
    assert counts["articles"] == 20 and 120 <= counts["invoice_lines"] <= 600
    with engine.connect() as conn:
        sums = {t: table_checksum(conn, t).digest for t in samples.TABLES}
    engine.dispose()
    return sums


def test_same_seed_same_content_on_every_database(tmp_path: Path, db_url: str) -> None:
    assert make(db_url) == make(f"sqlite:///{tmp_path / 'other.db'}")
    assert make(f"sqlite:///{tmp_path / 'seed2.db'}", seed=2) != make(
        f"sqlite:///{tmp_path / 'seed1.db'}"
    )


def test_totals_and_foreign_keys_hold(db_url: str) -> None:
    engine = open_engine(db_url)
    samples.create_schema(engine)
    samples.generate(engine, customers=30, invoices=80, seed=3)
    inv, lines = samples.invoices, samples.invoice_lines
    with engine.connect() as conn:
        sums = dict(
            conn.execute(
                select(lines.c.invoice_id, func.sum(lines.c.line_total)).group_by(
                    lines.c.invoice_id
                )
            ).all()
        )
        for invoice_id, total in conn.execute(select(inv.c.id, inv.c.total)):
            assert sums[invoice_id] == total
        orphans = conn.execute(
            select(func.count())
            .select_from(lines)
            .where(~lines.c.article_id.in_(select(samples.articles.c.id)))
        ).scalar()
        assert orphans == 0
        names = conn.execute(select(samples.customers.c.name)).scalars().all()
        assert any(ch in "".join(names) for ch in "üŁøçñß")
    engine.dispose()


def test_generator_script_and_refusal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [sys.executable, str(ROOT / "samples" / "generate.py"), "--db", url]
    first = subprocess.run(
        [*cmd, "--customers", "10", "--invoices", "20"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "10 customers" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert "already holds 10 rows" in again.stderr and "Traceback" not in again.stderr
