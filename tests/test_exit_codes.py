"""One exit-code table, true for every command (issue 20, item 5).

Every command of the CLI runs as a user runs it (a real process), once where
it succeeds and once or twice where it typically fails; its exit code must
be the one :data:`mailsync.errors.EXIT_CODES` (and so the README) gives, and
a failure must be one ``error:`` line without a traceback. The issue's own
scenario — a mistyped database path, an unknown config key, a wrong mailbox
password — is here too, the password against the suite's real Dovecot.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from mailsync.errors import EXIT_CODES
from tests.cluster import Cluster
from tests.servers.mail import MailServers, password_of
from tests.test_cli import SCHEMA, enroll, init_both, mailsync
from tests.test_mail import mailbox as real_mailbox

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hq and koeln made and enrolled by the CLI; customers synced; a range;
    beside them, copies of hq's config with the issue's mistakes."""
    root = tmp_path_factory.mktemp("codes")
    for name in ("hq", "koeln"):
        (root / name).mkdir()
        with sqlite3.connect(root / name / "app.db") as conn:
            conn.executescript(SCHEMA)
    init_both(root)
    enroll(root)
    hq, koeln = root / "hq", root / "koeln"
    mailsync("table", "add", "customers", "--down", "all", "--up", "all", cwd=hq)
    mailsync("range", "add", "kd_no", "--start", "1000", "--end", "1999", cwd=hq)
    for where in (hq, koeln, hq, koeln):
        mailsync("sync", cwd=where)
    config = (hq / "mailsync.toml").read_text()
    (root / "typo").mkdir()
    (root / "typo" / "mailsync.toml").write_text(
        config.replace('database = "sqlite:///app.db"', 'database = "sqlite:///ap.db"')
    )
    shutil.copy(hq / "mailsync.key", root / "typo" / "mailsync.key")
    (root / "unknown").mkdir()
    (root / "unknown" / "mailsync.toml").write_text(
        config.replace("[mailbox]\n", "[mailbox]\nkeep_procesed = false\n", 1)
    )
    # hq with [alerts]: one whose mail goes to the post office, one whose
    # SMTP server is not there
    absolute = config.replace('"sqlite:///app.db"', f'"sqlite:///{hq / "app.db"}"')
    alerting = absolute + '\n[alerts]\nto = "it@x.test"\n'
    dead = re.sub(r"(?m)^send = .*$", 'send = "smtp://hq%40x.test@127.0.0.1:9"', alerting)
    for name, text in (("alerting", alerting), ("dead-smtp", dead)):
        (root / name).mkdir()
        (root / name / "mailsync.toml").write_text(
            text.replace("[mailbox]\n", "[mailbox]\ntimeout = 3\n", 1)
        )
        shutil.copy(hq / "mailsync.key", root / name / "mailsync.key")
    (root / "garbage.eml").write_bytes(b"From: someone\r\n\r\nnot ours\r\n")
    (root / "stores.csv").write_text("id,email,label\nbonn2,bonn2@x.test,Bonn\nulm,ulm@x.test,\n")
    (root / "bad-stores.csv").write_text("id,email\nulm,ulm\nulm,u@x.test\n")
    (root / "demo-taken").mkdir()
    (root / "demo-taken" / "mine.txt").write_text("keep me")
    return root


#: (what, folder, arguments, exit code); in order: later cases may change
#: what earlier ones read (a rotated key, a removed station)
CASES: list[tuple[str, str, tuple[str, ...], int]] = [
    ("version", "hq", ("--version",), 0),
    ("unknown command", "hq", ("synk",), 2),
    ("unknown option", "hq", ("sync", "--fast"), 2),
    ("missing argument", "hq", ("inspect",), 2),
    ("no config here", ".", ("status",), 2),
    ("status", "hq", ("status",), 0),
    ("status json", "hq", ("status", "--json"), 0),
    ("status openmetrics", "hq", ("status", "--format", "openmetrics"), 0),
    ("status bad format", "hq", ("status", "--format", "yaml"), 2),
    ("sync", "koeln", ("sync",), 0),
    ("sync json", "hq", ("sync", "--json"), 0),
    ("sync: mistyped database path", "typo", ("sync",), 3),
    ("sync: unknown config key", "unknown", ("sync",), 2),
    ("serve once", "hq", ("serve", "--once"), 0),
    ("serve without a schedule", "hq", ("serve",), 2),
    ("schedule without a config", ".", ("schedule", "--every", "45m", "--days", "mon-fri"), 0),
    ("schedule nonsense", ".", ("schedule", "--every", "45x"), 2),
    ("log", "hq", ("log", "--since", "2h"), 0),
    ("log bad since", "hq", ("log", "--since", "yesterday-ish"), 2),
    ("mailbox test", "hq", ("mailbox", "test"), 0),
    ("keys show", "hq", ("keys", "show"), 0),
    ("inspect not a mailsync message", "hq", ("inspect", "../garbage.eml"), 1),
    ("inspect no such file", "hq", ("inspect", "../nothing.eml"), 2),
    ("errors list", "hq", ("errors", "list"), 0),
    ("errors retry unknown id", "hq", ("errors", "retry", "424242"), 2),
    ("errors drop nothing named", "hq", ("errors", "drop"), 2),
    ("inbox list", "hq", ("inbox", "list"), 0),
    ("inbox show nothing buffered", "hq", ("inbox", "show", "koeln", "99"), 2),
    ("inbox retry unknown peer", "hq", ("inbox", "retry", "nobody"), 2),
    ("conflicts list", "hq", ("conflicts", "list"), 0),
    ("conflicts drop nothing named", "hq", ("conflicts", "drop"), 2),
    ("station list", "hq", ("station", "list"), 0),
    ("station show", "hq", ("station", "show", "koeln"), 0),
    ("station show unknown", "hq", ("station", "show", "bonn"), 2),
    ("station add bad address", "hq", ("station", "add", "bonn", "--email", "bonn"), 2),
    ("station edit", "hq", ("station", "edit", "koeln", "--label", "Köln Süd"), 0),
    ("station add on a remote", "koeln", ("station", "add", "bonn", "--email", "b@x.test"), 2),
    ("table list", "hq", ("table", "list"), 0),
    ("table add no primary key", "hq", ("table", "add", "keyless"), 3),
    ("table add no such table", "hq", ("table", "add", "nosuch"), 3),
    ("table add bad ops", "hq", ("table", "add", "customers", "--down", "upsert"), 2),
    ("table remove unknown", "hq", ("table", "remove", "nosuch"), 2),
    ("reload", "hq", ("reload", "--station", "koeln"), 0),
    ("reload unknown station", "hq", ("reload", "--station", "bonn"), 2),
    ("verify", "hq", ("verify", "--station", "koeln", "--table", "customers"), 0),
    ("verify unknown station", "hq", ("verify", "--station", "bonn"), 2),
    ("verify on a remote", "koeln", ("verify",), 2),
    ("table resync", "hq", ("table", "resync", "customers"), 0),
    ("table resync not synced", "hq", ("table", "resync", "keyless"), 2),
    ("table resync on a remote", "koeln", ("table", "resync", "customers"), 2),
    ("conflicts resolve unknown", "hq", ("conflicts", "resolve", "999", "--keep", "host"), 2),
    ("conflicts resolve bad keep", "hq", ("conflicts", "resolve", "1", "--keep", "both"), 2),
    ("range list", "hq", ("range", "list"), 0),
    ("range show", "hq", ("range", "show", "kd_no"), 0),
    ("range show unknown", "hq", ("range", "show", "nosuch"), 6),
    (
        "range add overlapping nonsense",
        "hq",
        ("range", "add", "x", "--start", "9", "--end", "1"),
        2,
    ),
    ("range set-block", "hq", ("range", "set-block", "kd_no", "20"), 0),
    ("number next", "koeln", ("number", "next", "kd_no"), 0),
    ("number next unknown range", "koeln", ("number", "next", "nosuch"), 6),
    ("alerts test without [alerts]", "hq", ("alerts", "test"), 2),
    ("alerts test", "alerting", ("alerts", "test"), 0),
    ("alerts test, no SMTP server", "dead-smtp", ("alerts", "test"), 4),
    ("mailbox test, no SMTP server", "dead-smtp", ("mailbox", "test"), 4),
    ("conflicts drop all", "hq", ("conflicts", "drop", "--all"), 0),
    ("conflicts list bad limit", "hq", ("conflicts", "list", "--limit", "-1"), 2),
    ("errors retry all", "hq", ("errors", "retry", "--all"), 0),
    ("errors drop all", "hq", ("errors", "drop", "--all"), 0),
    ("inbox retry nothing buffered", "hq", ("inbox", "retry", "koeln"), 2),
    ("inbox drop nothing buffered", "hq", ("inbox", "drop", "koeln", "99"), 2),
    (
        "init",
        "new-node",
        ("init", "remote", "--id", "bonn", "--db", "sqlite:///app.db", "--address", "b@x.test"),
        0,
    ),
    ("range add", "hq", ("range", "add", "inv_no", "--start", "5000", "--end", "5999"), 0),
    ("range release unknown", "hq", ("range", "release", "nosuch"), 6),
    ("range set-block zero", "hq", ("range", "set-block", "kd_no", "0"), 2),
    ("station add", "hq", ("station", "add", "bonn", "--email", "bonn@x.test"), 0),
    ("station add twice", "hq", ("station", "add", "bonn", "--email", "bonn2@x.test"), 2),
    (
        "station add --csv --dry-run",
        "hq",
        ("station", "add", "--csv", "../stores.csv", "--dry-run"),
        0,
    ),
    ("station add --csv", "hq", ("station", "add", "--csv", "../stores.csv"), 0),
    ("station add --csv again", "hq", ("station", "add", "--csv", "../stores.csv"), 2),
    ("station add --csv, rows wrong", "hq", ("station", "add", "--csv", "../bad-stores.csv"), 2),
    ("station add --csv with an ID", "hq", ("station", "add", "x", "--csv", "../stores.csv"), 2),
    ("station add --csv on a remote", "koeln", ("station", "add", "--csv", "../stores.csv"), 2),
    ("station disable", "hq", ("station", "disable", "bonn"), 0),
    ("station disable twice", "hq", ("station", "disable", "bonn"), 2),
    ("station enable", "hq", ("station", "enable", "bonn"), 0),
    ("station enable, not disabled", "hq", ("station", "enable", "bonn"), 2),
    ("station disable unknown", "hq", ("station", "disable", "nobody"), 2),
    ("station edit unknown", "hq", ("station", "edit", "nobody", "--label", "x"), 2),
    ("station remove unknown", "hq", ("station", "remove", "nobody", "--yes"), 2),
    ("station list on a remote", "koeln", ("station", "list"), 2),
    ("demo into a folder in use", ".", ("demo", "demo-taken"), 2),
    (
        "init over a config",
        "hq",
        ("init", "host", "--id", "hq", "--db", "sqlite:///app.db", "--address", "hq@x.test"),
        2,
    ),
    (
        "init bad id",
        "new",
        ("init", "host", "--id", "H Q", "--db", "sqlite:///app.db", "--address", "hq@x.test"),
        2,
    ),
    ("join no such bundle", "koeln", ("join", "../nothing.bundle"), 2),
    ("range release", "hq", ("range", "release", "kd_no", "--station", "koeln"), 0),
    ("range remove in use", "hq", ("range", "remove", "kd_no"), 6),
    ("keys rotate", "koeln", ("keys", "rotate"), 0),
    ("station remove", "hq", ("station", "remove", "koeln", "--yes"), 0),
    ("table remove", "hq", ("table", "remove", "customers"), 0),
]


def test_the_table_is_the_readmes() -> None:
    """README's table and errors.EXIT_CODES say the same codes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    codes = {int(c) for c in re.findall(r"(?m)^\| `(\d+)` \|", section)}
    assert codes == set(EXIT_CODES)


@pytest.mark.parametrize(("what", "folder", "args", "code"), CASES, ids=[c[0] for c in CASES])
def test_every_command_exits_as_the_table_says(
    site: Path, what: str, folder: str, args: tuple[str, ...], code: int
) -> None:
    assert code in EXIT_CODES
    cwd = site / folder
    cwd.mkdir(exist_ok=True)
    done = mailsync(*args, cwd=cwd, ok=False, env={"MAILSYNC_PASSPHRASE": "x"})
    out = done.stdout + done.stderr
    assert done.returncode == code, f"{what}: exit {done.returncode}, not {code}:\n{out}"
    assert "Traceback" not in out, out
    said = [line for line in out.splitlines() if line.startswith(("error:", "FAIL "))]
    if code == 0:
        assert not said, out
    elif "Usage:" not in done.stderr:  # typer's usage errors draw a box instead
        # what failed, in one line (`mailbox test` says FAIL per account)
        assert len(said) == 1, out


def test_the_issues_scenario_one_line_each(
    tmp_path: Path, site: Path, mail_servers: MailServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped database path (3), an unknown key (2), a wrong mailbox
    password (4): each one line, naming what and where."""
    typo = mailsync("sync", cwd=site / "typo", ok=False)
    assert typo.returncode == 3 and "no database file at" in typo.stderr.splitlines()[0]
    assert str(site / "typo" / "ap.db") in typo.stderr
    unknown = mailsync("sync", cwd=site / "unknown", ok=False)
    assert unknown.returncode == 2
    assert re.match(
        r"error: .*mailsync\.toml:\d+ \[mailbox\]: unknown setting 'keep_procesed' "
        r"\(did you mean 'keep_processed'\?\)",
        unknown.stderr,
    ), unknown.stderr
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        monkeypatch.setenv("TEST_PW_HQ", password_of("hq") + "-wrong")
        c.set_mailbox("hq", real_mailbox(mail_servers, "hq"))
        done = c.cli("hq", "sync")
        out = done.stdout + done.stderr
        assert done.returncode == 4, out
        # the cycle's summary, then one line per account the password opens
        # (it reads by IMAP and sends by SMTP: both refuse it)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert "Traceback" not in out, out
        assert [e.split("://")[0] for e in errors] == ["error: imaps", "error: smtp+starttls"], out
        assert all("login failed for hq@example.test" in e for e in errors), errors
        # the URL itself mistyped: the config's (2), before any login
        monkeypatch.setenv("TEST_PW_HQ", password_of("hq"))
        c.set_mailbox("hq", real_mailbox(mail_servers, "hq"))
        path = tmp_path / "hq" / "mailsync.toml"
        path.write_text(path.read_text().replace('receive = "imaps:', 'receive = "imapz:'))
        done = c.cli("hq", "mailbox", "test")
        assert done.returncode == 2 and "'imapz' cannot receive" in done.stderr, done.stderr
    finally:
        c.close()


def _commands() -> list[tuple[str, ...]]:
    """Every command path of the CLI: ("sync",), ("station", "add"), …"""
    import typer.main

    from mailsync.cli import app

    group = typer.main.get_command(app)
    out: list[tuple[str, ...]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, (*path, name))
        elif path:
            out.append(path)

    walk(group, ())
    return out


def test_every_command_has_help_and_a_row_in_the_readme(tmp_path: Path) -> None:
    """Executable docs: no command the README's reference does not name."""
    from typer.testing import CliRunner

    from mailsync.cli import app

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `mailsync ")]
    commands = _commands()
    assert ("alerts", "test") in commands and ("status",) in commands
    for path in commands:
        done = CliRunner().invoke(app, [*path, "--help"])
        assert done.exit_code == 0 and "Usage" in done.output, (path, done.output)
        head = f"`mailsync {path[0]}"
        mine = [r for r in rows if head in r]
        assert mine, f"no README row for mailsync {' '.join(path)}"
        if len(path) > 1:
            assert any(re.search(rf"\b{re.escape(path[1])}\b", r) for r in mine), path


def test_every_command_has_a_case() -> None:
    """A new command without a case in CASES fails here."""
    covered = {p for p in _commands() for _, _, args, _ in CASES if tuple(args[: len(p)]) == p}
    assert set(_commands()) == covered, set(_commands()) - covered
