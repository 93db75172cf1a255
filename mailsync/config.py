"""The node configuration file (TOML): local settings only.

Everything mailsync must *remember* lives in the database; the config file
says who this node is and where things are: node id and role, database URL,
mailbox URLs and address. Who the host is, and every peer's public key,
is state: a remote learns it by ``mailsync join BUNDLE`` and keeps it in its
database. The private keys are in a key file beside the config.
Relative paths (a SQLite file, a ``maildir:`` post office) are resolved from
the folder that holds the config file, so a node folder can be moved whole.

``--config FILE`` selects a node, else ``$MAILSYNC_CONFIG``, else
``./mailsync.toml``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mailsync.alerts.settings import AlertSettings, read_alerts, render_alerts
from mailsync.errors import ConfigError
from mailsync.keys import DEFAULT_GRACE_DAYS
from mailsync.schedule import Schedule, parse_schedule, parse_zone
from mailsync.transport.account import Secret
from mailsync.wire.limits import DEFAULT_LIMITS, LIMIT_KEYS, Limits

DEFAULT_CONFIG = "mailsync.toml"
#: the tables a config file may have
SECTIONS = ("node", "mailbox", "schedule", "limits", "alerts")
CONFIG_ENV = "MAILSYNC_CONFIG"
DEFAULT_COMPRESSION_LEVEL = 3
#: small changesets, compressed with the link's dictionary (see
#: mailsync/dictionaries.py): bytes of a dictionary (0: none), the level,
#: the samples one is trained from, changesets before the next one
DEFAULT_DICTIONARY_BYTES = 8192
DEFAULT_DICTIONARY_LEVEL = 9
DEFAULT_DICTIONARY_SAMPLES = 24
DEFAULT_DICTIONARY_ROTATE = 1000
MAX_DICTIONARY_BYTES = 1024 * 1024
DEFAULT_BATCH_ROWS = 5000
#: An unacknowledged message is sent again after this long.
DEFAULT_RESEND_AFTER_MINUTES = 60.0
#: A gap in the inbound sequence older than this is asked for explicitly.
DEFAULT_GAP_REQUEST_MINUTES = 15.0

Role = Literal["host", "remote"]
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s/]+@[^@\s/]+$")


def check_node_id(value: str, what: str = "node id") -> str:
    """Node ids travel in subjects, file names and SQL: keep them plain."""
    if not _NODE_ID.match(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: use 1-64 of a-z, 0-9, '-' and '_' "
            "(starting with a letter or digit)"
        )
    return value


def check_email(value: str, what: str = "address") -> str:
    if not _EMAIL.match(value):
        raise ConfigError(f"{what} {value!r} is not an e-mail address")
    return value


#: Whole-message limit: fits a provider's 10 MB (10,240,000-byte) limit,
#: base64 and headers included.
DEFAULT_MAX_MESSAGE_BYTES = 10_000_000

#: The node's log in the database keeps this many days.
DEFAULT_LOG_RETENTION_DAYS = 10


@dataclass(frozen=True)
class MailboxConfig:
    address: str
    send: str
    receive: str
    keep_processed: bool = True
    secret: Secret = field(default_factory=Secret)
    ca_file: Path | None = None
    insecure: bool = False
    timeout: float = 60.0
    processed_folder: str = "Processed"
    unrecognized_folder: str = "Unrecognized"
    forward_unrecognized: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    node_id: str
    role: Role
    database: str
    mailbox: MailboxConfig
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    dictionary_bytes: int = DEFAULT_DICTIONARY_BYTES
    dictionary_level: int = DEFAULT_DICTIONARY_LEVEL
    dictionary_samples: int = DEFAULT_DICTIONARY_SAMPLES
    dictionary_rotate: int = DEFAULT_DICTIONARY_ROTATE
    batch_rows: int = DEFAULT_BATCH_ROWS
    key_grace_days: int = DEFAULT_GRACE_DAYS
    resend_after_minutes: float = DEFAULT_RESEND_AFTER_MINUTES
    gap_request_minutes: float = DEFAULT_GAP_REQUEST_MINUTES
    log_retention_days: int = DEFAULT_LOG_RETENTION_DAYS
    #: when ``mailsync serve`` syncs on its own ([[schedule]] tables)
    schedules: tuple[Schedule, ...] = ()
    #: the schedules' time zone (None: the machine's)
    timezone: str | None = None
    #: how much a received message may make this node decode ([limits])
    limits: Limits = DEFAULT_LIMITS
    #: where the database's password comes from, when not from libpq's own
    #: PGPASSWORD / ~/.pgpass (never the config: ``database_password_*``)
    database_secret: Secret = field(default_factory=Secret)
    #: who is told when something needs a person ([alerts]; off without it)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def database_url(self) -> str:
        """The database URL with its password filled in from its source."""
        password = self.database_secret.resolve(f"{self.path} [node] database")
        if password is None:
            return self.database
        url = make_url(self.database)
        if url.password is not None:
            raise ConfigError(
                f"{self.path} [node]: the database URL has a password and a "
                "database_password_* source is set too; give it in one place"
            )
        return url.set(password=password).render_as_string(hide_password=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """Which config file a command means."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_CONFIG)


def resolve_database(url: str, base_dir: Path) -> str:
    """A SQLite path relative to the config file's folder, made absolute."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database URL {url!r} is not valid") from exc
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_absolute():
            return parsed.set(database=str((base_dir / db).resolve())).render_as_string(
                hide_password=False
            )
    return url


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


class _Section(dict[str, Any]):
    """A config table that remembers which keys were asked for, so that
    the rest can be refused (a misspelt key would otherwise keep its
    default without a word: ``log_retension_days = 5``)."""

    def __init__(self, data: dict[str, Any], text: str, header: str) -> None:
        super().__init__(data)
        self.asked: set[str] = set()
        self.text = text
        self.header = header  # "node", "mailbox", "limits", "schedule"

    def line_of(self, key: str) -> int | None:
        """The line of ``key = …`` in this section of the file (TOML keeps none)."""
        section = None
        for number, line in enumerate(self.text.splitlines(), start=1):
            head = re.match(r"^\s*\[+\s*([A-Za-z0-9_.-]+)\s*\]+", line)
            if head:
                section = head.group(1)
            elif section == self.header and re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return number
        return None


#: a type as the config's reader would say it
_WORDS: dict[Any, str] = {
    int: "a whole number",
    str: "text in quotes",
    bool: "true or false",
    str | list: "an address in quotes or a list of them",
}


def _at(table: dict[str, Any], key: str, where: str) -> str:
    """``where`` with the key's line, when it is known."""
    line = table.line_of(key) if isinstance(table, _Section) else None
    if line is None:
        return where
    cut = where.rfind(" [")
    if cut < 0:
        return f"{where}:{line}"
    return f"{where[:cut]}:{line}{where[cut:]}"


def _get(table: dict[str, Any], key: str, kind: Any, where: str, default: Any = ...) -> Any:
    if isinstance(table, _Section):
        table.asked.add(key)
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing setting {key!r}")
        return default
    value = table[key]
    if (kind is int or kind == int | float) and isinstance(value, bool):
        value = str(value).lower()  # said as written: true/false
        kind_ok = False
    else:
        kind_ok = isinstance(value, kind)
    if not kind_ok:
        words = _WORDS.get(kind, "a number")
        shown = json.dumps(value) if isinstance(value, str | int | float) else repr(value)
        raise ConfigError(f"{_at(table, key, where)}: {key} must be {words}, not {shown}")
    return value


def _refuse_unknown(table: dict[str, Any], where: str) -> None:
    """A key no setting asked for is a mistake: name it, and what was meant."""
    if not isinstance(table, _Section):
        return
    for key in sorted(set(table) - table.asked):
        near = difflib.get_close_matches(key, sorted(table.asked), n=1, cutoff=0.6)
        raise ConfigError(
            f"{_at(table, key, where)}: unknown setting {key!r}"
            + (f" (did you mean {near[0]!r}?)" if near else ""),
            hint=f"the settings here are {', '.join(sorted(table.asked))}",
        )


def load_config(path: Path) -> NodeConfig:
    """Read and check a node config; ConfigError names the file and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no config file at {path}",
            hint="run `mailsync init host|remote ...` here, or pass --config FILE",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    base = path.resolve().parent
    for name in sorted(set(data) - set(SECTIONS)):
        near = difflib.get_close_matches(name, SECTIONS, n=1, cutoff=0.6)
        raise ConfigError(
            f"{path}: unknown section [{name}]" + (f" (did you mean [{near[0]}]?)" if near else ""),
            hint=f"the sections are {', '.join(f'[{n}]' for n in SECTIONS)}",
        )
    node = data.get("node")
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: missing [node] section")
    node = _Section(node, text, "node")
    where = f"{path} [node]"
    node_id = check_node_id(_get(node, "id", str, where), f"{where} id")
    role = _get(node, "role", str, where)
    if role not in ("host", "remote"):
        raise ConfigError(f"{where}: role must be 'host' or 'remote', not {role!r}")
    database = resolve_database(_get(node, "database", str, where), base)
    level = _get(node, "compression_level", int, where, DEFAULT_COMPRESSION_LEVEL)
    if not 1 <= level <= 22:
        raise ConfigError(f"{where}: compression_level must be 1-22, not {level}")
    dict_level = _get(node, "dictionary_level", int, where, DEFAULT_DICTIONARY_LEVEL)
    if not 1 <= dict_level <= 22:
        raise ConfigError(f"{where}: dictionary_level must be 1-22, not {dict_level}")
    dict_bytes = _get(node, "dictionary_bytes", int, where, DEFAULT_DICTIONARY_BYTES)
    if dict_bytes != 0 and not 256 <= dict_bytes <= MAX_DICTIONARY_BYTES:
        raise ConfigError(
            f"{where}: dictionary_bytes must be 0 (no dictionaries) or "
            f"256-{MAX_DICTIONARY_BYTES}, not {dict_bytes}"
        )
    samples = _get(node, "dictionary_samples", int, where, DEFAULT_DICTIONARY_SAMPLES)
    rotate = _get(node, "dictionary_rotate", int, where, DEFAULT_DICTIONARY_ROTATE)
    if samples < 4 or rotate < samples:
        raise ConfigError(
            f"{where}: dictionary_samples must be at least 4 and dictionary_rotate at "
            f"least dictionary_samples, not {samples} and {rotate}"
        )
    batch = _get(node, "batch_rows", int, where, DEFAULT_BATCH_ROWS)
    if batch < 1:
        raise ConfigError(f"{where}: batch_rows must be at least 1")
    grace = _get(node, "key_grace_days", int, where, DEFAULT_GRACE_DAYS)
    if grace < 0:
        raise ConfigError(f"{where}: key_grace_days must not be negative")
    resend = _get(node, "resend_after_minutes", int | float, where, DEFAULT_RESEND_AFTER_MINUTES)
    gap = _get(node, "gap_request_minutes", int | float, where, DEFAULT_GAP_REQUEST_MINUTES)
    if resend < 0 or gap < 0:
        raise ConfigError(f"{where}: resend_after_minutes and gap_request_minutes must be >= 0")
    retention = _get(node, "log_retention_days", int, where, DEFAULT_LOG_RETENTION_DAYS)
    if retention < 1:
        raise ConfigError(f"{where}: log_retention_days must be at least 1")
    db_sources = [
        k
        for k in ("database_password_env", "database_password_file", "database_password_command")
        if k in node
    ]
    if len(db_sources) > 1:
        raise ConfigError(f"{where}: give only one of {', '.join(db_sources)}")
    db_password_file = _get(node, "database_password_file", str, where, None)
    database_secret = Secret(
        env=_get(node, "database_password_env", str, where, None),
        file=_resolve(base, db_password_file) if db_password_file else None,
        command=_get(node, "database_password_command", str, where, None),
    )
    timezone = _get(node, "timezone", str, where, None)
    if timezone:
        parse_zone(timezone, where)
    _refuse_unknown(node, where)
    schedules = _schedules(data.get("schedule", []), path, text)
    limits = _limits(data.get("limits", {}), path, text)

    box = data.get("mailbox")
    if not isinstance(box, dict):
        raise ConfigError(f"{path}: missing [mailbox] section")
    box = _Section(box, text, "mailbox")
    where = f"{path} [mailbox]"
    sources = [k for k in ("password_env", "password_file", "password_command") if k in box]
    if len(sources) > 1:
        raise ConfigError(f"{where}: give only one of {', '.join(sources)}")
    password_file = _get(box, "password_file", str, where, None)
    ca_file = _get(box, "ca_file", str, where, None)
    forward = _get(box, "forward_unrecognized", str, where, None)
    limit = _get(box, "max_message_bytes", int, where, DEFAULT_MAX_MESSAGE_BYTES)
    if limit < 10_000:
        raise ConfigError(f"{where}: max_message_bytes must be at least 10000")
    timeout = _get(box, "timeout", int | float, where, 60)
    if timeout <= 0:
        raise ConfigError(f"{where}: timeout must be positive")
    mailbox = MailboxConfig(
        address=check_email(_get(box, "address", str, where), f"{where} address"),
        send=_get(box, "send", str, where),
        receive=_get(box, "receive", str, where),
        keep_processed=_get(box, "keep_processed", bool, where, True),
        secret=Secret(
            env=_get(box, "password_env", str, where, None),
            file=_resolve(base, password_file) if password_file else None,
            command=_get(box, "password_command", str, where, None),
        ),
        ca_file=_resolve(base, ca_file) if ca_file else None,
        insecure=_get(box, "insecure", bool, where, False),
        timeout=float(timeout),
        processed_folder=_get(box, "processed_folder", str, where, "Processed"),
        unrecognized_folder=_get(box, "unrecognized_folder", str, where, "Unrecognized"),
        forward_unrecognized=check_email(forward, f"{where} forward_unrecognized")
        if forward
        else None,
        max_message_bytes=limit,
    )
    _refuse_unknown(box, where)
    _check_urls(mailbox, where)
    alerts = _alerts(data.get("alerts"), path, text, mailbox.address)
    return NodeConfig(
        path=path,
        node_id=node_id,
        role=role,
        database=database,
        mailbox=mailbox,
        compression_level=level,
        dictionary_bytes=dict_bytes,
        dictionary_level=dict_level,
        dictionary_samples=samples,
        dictionary_rotate=rotate,
        batch_rows=batch,
        key_grace_days=grace,
        resend_after_minutes=float(resend),
        gap_request_minutes=float(gap),
        log_retention_days=retention,
        schedules=schedules,
        timezone=timezone,
        limits=limits,
        database_secret=database_secret,
        alerts=alerts,
    )


def _alerts(value: Any, path: Path, text: str, own_address: str) -> AlertSettings:
    """The [alerts] table (:mod:`mailsync.alerts.settings`); none: alerts off."""
    if value is None:
        return AlertSettings()
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: alerts must be an [alerts] table")
    section = _Section(value, text, "alerts")
    where = f"{path} [alerts]"
    settings = read_alerts(
        lambda key, kind, default: _get(section, key, kind, where, default), where, own_address
    )
    _refuse_unknown(section, where)
    return settings


def _check_urls(box: MailboxConfig, where: str) -> None:
    """Both mailbox URLs name a transport that can do their job, at load:
    a bad ``send`` would otherwise go unnoticed while there is nothing to send."""
    from mailsync.transport import known_schemes, scheme_of

    senders, receivers = known_schemes()
    for key, url, known in (("send", box.send, senders), ("receive", box.receive, receivers)):
        scheme = scheme_of(url)
        if scheme not in known:
            raise ConfigError(
                f"{where}: {key} URL {url!r}: {scheme!r} cannot {key}",
                hint=f"{key} takes {', '.join(f'{s}:' for s in sorted(known))}",
            )


def _limits(value: Any, path: Path, text: str = "") -> Limits:
    """The [limits] table: whole numbers of at least 1; a misspelt key is an
    error (a limit that silently kept its default would be a surprise)."""
    where = f"{path} [limits]"
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: limits must be a [limits] table")
    value = _Section(value, text, "limits")
    given = {}
    for key in LIMIT_KEYS:
        number = _get(value, key, int, where, getattr(DEFAULT_LIMITS, key))
        if number < 1:
            raise ConfigError(f"{where}: {key} must be at least 1")
        given[key] = number
    _refuse_unknown(value, where)
    return Limits(**given)


def _schedules(value: Any, path: Path, text: str = "") -> tuple[Schedule, ...]:
    """The [[schedule]] tables: every (required), between and days."""
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: schedule must be [[schedule]] tables")
    out = []
    for number, table in enumerate(tables, start=1):
        where = f"{path} [[schedule]] #{number}"
        section = _Section(table, text, "schedule")
        out.append(
            parse_schedule(
                _get(section, "every", str, where),
                _get(section, "between", str, where, None),
                _get(section, "days", str, where, None),
                where=where,
            )
        )
        _refuse_unknown(section, where)
    return tuple(out)


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts)."""
    return json.dumps(value, ensure_ascii=False)


def render_config(
    *,
    node_id: str,
    role: Role,
    database: str,
    address: str,
    mail: str,
    send: str | None = None,
    receive: str | None = None,
    password_env: str | None = None,
    password_file: str | None = None,
) -> str:
    """The text of a new config file: every setting there is, the ones
    not given commented out at their defaults, so that an admin reads what
    can be set in the file itself (a test uncomments them all and loads it)."""
    if password_env and password_file:
        raise ConfigError("give only one of --password-env and --password-file")
    password = (
        f"password_env = {_q(password_env)}"
        if password_env
        else f"password_file = {_q(password_file)}"
        if password_file
        else '# password_env = "MAILSYNC_PASSWORD"   # or password_file = "…" / '
        'password_command = "pass show mail/…"'
    )
    lines = [
        "# mailsync node configuration. Local settings only: everything mailsync",
        "# remembers (stations, rules, sequence numbers) lives in the database.",
        "# Relative paths are taken from the folder that holds this file. A setting",
        "# mailsync does not know is refused, not ignored.",
        "",
        "[node]",
        f"id = {_q(node_id)}",
        f"role = {_q(role)}            # host | remote",
        f"database = {_q(database)}    # any SQLAlchemy URL (no password in it)",
        "# where the database password comes from, if libpq's PGPASSWORD or",
        "# ~/.pgpass does not give it (one of the three):",
        '# database_password_env = "MAILSYNC_DB_PASSWORD"',
        '# database_password_file = "db-password.txt"',
        '# database_password_command = "pass show db/firma"',
        f"compression_level = {DEFAULT_COMPRESSION_LEVEL}   # zstd level, 1-22",
        f"dictionary_bytes = {DEFAULT_DICTIONARY_BYTES}   # per-link dictionary for small "
        "changesets (0: none)",
        f"# dictionary_level = {DEFAULT_DICTIONARY_LEVEL}      # zstd level with the dictionary",
        f"# dictionary_samples = {DEFAULT_DICTIONARY_SAMPLES}   # small bodies it is trained from",
        f"# dictionary_rotate = {DEFAULT_DICTIONARY_ROTATE}  # changesets until the next one",
        f"batch_rows = {DEFAULT_BATCH_ROWS}          # rows per batch when building/applying",
        f"key_grace_days = {DEFAULT_GRACE_DAYS}        # replaced keys still open mail this long",
        f"resend_after_minutes = {DEFAULT_RESEND_AFTER_MINUTES:g}  # unacknowledged mail is resent",
        f"gap_request_minutes = {DEFAULT_GAP_REQUEST_MINUTES:g}   # a missing message is asked for",
        f"# log_retention_days = {DEFAULT_LOG_RETENTION_DAYS}   # days the node's log keeps",
        "# timezone = \"Europe/Berlin\"   # the schedules' time zone (default: the machine's)",
        "# private keys: the .key file beside this one (owner-only, 0600)",
        "",
        "[mailbox]",
        f"address = {_q(address)}   # this node's e-mail address",
        "# smtp+starttls://USER@HOST:587, smtps://USER@HOST, imaps://USER@HOST,",
        "# pop3s://USER@HOST (USER with @ written %40); maildir:PATH is a local",
        "# post office: one Maildir per address under PATH.",
        f"send = {_q(send or mail)}",
        f"receive = {_q(receive or mail)}",
        password,
        "keep_processed = true    # move processed mail to Processed (false: delete)",
        '# ca_file = "company-ca.pem"   # a private CA to verify the servers against',
        "# insecure = false        # true: no certificate checks (tests only)",
        "# timeout = 60            # seconds for any one server operation",
        '# processed_folder = "Processed"',
        '# unrecognized_folder = "Unrecognized"',
        '# forward_unrecognized = "admin@example.com"   # mail that is not mailsync\'s',
        f"# max_message_bytes = {DEFAULT_MAX_MESSAGE_BYTES}   # larger changesets go in parts",
        "",
        "# When `mailsync serve` syncs (several [[schedule]] tables may be given):",
        "# [[schedule]]",
        '# every = "15m"',
        '# between = "06:00-22:00"',
        '# days = "mon-fri"',
        "",
        "# How much a received message may make this node decode; the defaults",
        "# admit what mailsync writes with a wide margin (see the README).",
        "# [limits]",
        *(f"# {key} = {getattr(DEFAULT_LIMITS, key)}" for key in LIMIT_KEYS),
        "",
        *render_alerts(),
    ]
    return "\n".join(lines) + "\n"
