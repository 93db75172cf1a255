"""Row filters: one SQL predicate over a table's own columns that bounds a
station's scope both ways (DESIGN §2, §12).

A filter is written by the host's admin (``table add T --filter SQL``) and
evaluated only by the host's database: when a changeset is built (which
rows a station receives; an update that takes a row outside travels as a
delete where the rule sends deletes), and when a station's rows come up
(:mod:`mailsync.admission`: the row before and after the change must lie
inside). So it is checked once, when the rule is defined, and refused with
one line naming the table and the problem if it cannot be what it claims:

- one predicate, not a statement: no ``;`` (outside quoted text);
- over the table's own columns: no subquery (``SELECT``), so a filter
  cannot read another table — a scope that depends on other tables
  (customers of a region kept in a separate table) is refused rather than
  evaluated against data the station never sees;
- parameters: ``:station`` (the station's id) and ``:email`` (its mailbox
  address), both optional; any other ``:name`` is refused;
- it must run: the predicate is evaluated once against the table (a
  misspelt column, a type the database cannot compare, fail now, not at
  the next sync).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, TextClause, and_, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from mailsync.errors import RuleError, first_line
from mailsync.store.reflection import reflect

#: What a filter may name with ``:name``, and what it stands for.
PARAMETERS = {"station": "the station's id", "email": "the station's mailbox address"}

#: Quoted text and quoted identifiers, which may hold anything.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_SELECT = re.compile(r"\bselect\b", re.IGNORECASE)


def _sql(row_filter: str) -> TextClause:
    """The filter as a text clause; a colon inside quoted text (``'10:30'``)
    is text, not a parameter."""
    escaped = _QUOTED.sub(lambda m: m.group(0).replace(":", "\\:"), row_filter)
    return text(f"({escaped})")


def predicate(row_filter: str, station: str, email: str = "") -> TextClause:
    """The filter as SQL for one station, its parameters bound (a filter
    need use none of them)."""
    clause = _sql(row_filter)
    values = {"station": station, "email": email}
    present = {k: v for k, v in values.items() if k in clause._bindparams}
    return clause.bindparams(**present) if present else clause


def check(conn: Connection, table_name: str, row_filter: str) -> None:
    """Refuse a filter that is not one predicate over ``table_name``'s own
    columns, or that does not run against it (RuleError, one line)."""
    where = f"row filter for table {table_name!r}"
    if not row_filter.strip():
        raise RuleError(f"{where} is empty", hint="leave --filter out to send every row")
    bare = _QUOTED.sub("''", row_filter)
    if ";" in bare:
        raise RuleError(
            f"{where} holds ';': a filter is one predicate, not statements",
            hint="e.g. --filter \"country = 'DE'\"",
        )
    if _SELECT.search(bare):
        raise RuleError(
            f"{where} holds a subquery (SELECT): a filter may use only the table's own "
            "columns (and :station, :email)",
            hint="keep what decides a station's rows in a column of the table itself",
        )
    names = set(_sql(row_filter)._bindparams)
    unknown = sorted(names - set(PARAMETERS))
    if unknown:
        allowed = ", ".join(f":{k} ({v})" for k, v in PARAMETERS.items())
        raise RuleError(f"{where} names :{unknown[0]}; a filter may use {allowed}")
    table = reflect(conn, table_name)
    try:
        with conn.begin_nested():
            conn.execute(
                select(func.count())
                .select_from(table)
                .where(and_(predicate(row_filter, "", "")))
                .limit(1)
            )
    except SQLAlchemyError as exc:
        raise RuleError(f"{where} does not work: {first_line(exc)}") from exc
