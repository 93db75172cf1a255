"""The command line, run as a user runs it: real processes, real files."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, credit NUMERIC(12,2));
CREATE TABLE keyless (a INTEGER, b TEXT);
"""


#: the package under test, where it is not the installed one (a worktree)
_PATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def mailsync(
    *args: str, cwd: Path, ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailsync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(cwd), **_PATH, **(env or {})},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, one error line that says what, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A host and a station folder, each with an application database."""
    for name in ("hq", "koeln"):
        (tmp_path / name).mkdir()
        with sqlite3.connect(tmp_path / name / "app.db") as conn:
            conn.executescript(SCHEMA)
    with sqlite3.connect(tmp_path / "hq" / "app.db") as conn:
        conn.execute("INSERT INTO customers VALUES (1, 'Müller', 10.5)")
    return tmp_path


def init_host(cwd: Path) -> None:
    mailsync(
        "init",
        "host",
        "--id",
        "hq",
        "--db",
        "sqlite:///app.db",
        "--address",
        "hq@x.test",
        "--mail",
        "maildir:../mail",
        cwd=cwd,
    )


def init_both(site: Path) -> None:
    init_host(site / "hq")
    mailsync(
        "init",
        "remote",
        "--id",
        "koeln",
        "--db",
        "sqlite:///app.db",
        "--address",
        "koeln@x.test",
        "--mail",
        "maildir:../mail",
        cwd=site / "koeln",
    )


def enroll(site: Path) -> None:
    """The first way: the station's own key goes to the host, a bundle comes back."""
    key = mailsync("keys", "show", cwd=site / "koeln").stdout.splitlines()[1]
    out = mailsync(
        "station",
        "add",
        "koeln",
        "--email",
        "koeln@x.test",
        "--label",
        "Köln",
        "--key",
        key,
        "--bundle",
        str(site / "koeln.bundle"),
        cwd=site / "hq",
    ).stdout
    assert "public data only" in out
    joined = mailsync("join", str(site / "koeln.bundle"), cwd=site / "koeln").stdout
    assert "joined host hq" in joined


def test_a_station_converges_through_the_cli(site: Path) -> None:
    init_both(site)
    hq, koeln = site / "hq", site / "koeln"
    enroll(site)
    out = mailsync("table", "add", "customers", "--up", "insert,update", cwd=hq).stdout
    assert "down insert,update,delete, up insert,update" in out
    assert "number range" in out  # warned: integer keys created offline collide
    assert "customers" in mailsync("table", "list", cwd=hq).stdout
    assert "koeln@x.test" in mailsync("station", "list", cwd=hq).stdout
    assert "customers" in mailsync("station", "show", "koeln", cwd=hq).stdout
    assert "sent 1 message" in mailsync("sync", cwd=hq).stdout
    assert "applied 1 changeset(s) / 1 row(s)" in mailsync("sync", cwd=koeln).stdout
    with sqlite3.connect(koeln / "app.db") as conn:
        conn.execute("INSERT INTO customers VALUES (500, 'Łódź', 1)")
    mailsync("sync", cwd=koeln)
    mailsync("sync", cwd=hq)
    with sqlite3.connect(hq / "app.db") as conn:
        assert conn.execute("SELECT name FROM customers WHERE id = 500").fetchone() == ("Łódź",)
    status = mailsync("status", cwd=hq).stdout
    assert "hq (host)" in status and "koeln" in status and "no peers yet" not in status
    assert "hq (remote)" not in status
    assert "koeln (remote)" in mailsync("status", cwd=koeln).stdout
    # MAILSYNC_CONFIG selects a node from anywhere
    env_proc = subprocess.run(
        [sys.executable, "-m", "mailsync", "status"],
        cwd=site,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MAILSYNC_CONFIG": str(hq / "mailsync.toml"), **_PATH},
        check=True,
    )
    assert "hq (host)" in env_proc.stdout
    mailsync("table", "remove", "customers", cwd=hq)
    mailsync("station", "remove", "koeln", "--yes", cwd=hq)
    assert "no stations" in mailsync("station", "list", cwd=hq).stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("status",), ("no config file at mailsync.toml",)),
        (("--config", "nope.toml", "sync"), ("no config file at nope.toml",)),
        (("table", "add", "nope"), ("'nope' does not exist",)),
        (("table", "add", "keyless"), ("no primary key",)),
        (("table", "add", "customers", "--filter", "region = :station"), ("row filter", "region")),
        (
            ("table", "add", "customers", "--down", "insert,upsert"),
            ("'upsert' is not an operation",),
        ),
        (("table", "add", "customers", "--station", "ghost"), ("no station 'ghost'",)),
        (("station", "add", "Bad Name", "--email", "x@y.test"), ("station id 'Bad Name'",)),
        (("station", "add", "k2", "--email", "not-an-address"), ("not an e-mail address",)),
        (("station", "remove", "ghost", "--yes"), ("no station 'ghost'",)),
    ],
)
def test_bad_input_gets_one_clear_line(
    site: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    hq = site / "hq"
    if args[0] != "status":
        init_host(hq)
    assert_clean_error(mailsync(*args, cwd=hq, ok=False), *needles)


def test_bad_config_files(site: Path) -> None:
    hq = site / "hq"
    cfg = hq / "mailsync.toml"
    init_host(hq)
    cfg.write_text("[node\nid = 1")
    assert_clean_error(mailsync("status", cwd=hq, ok=False), "not valid TOML")
    cfg.write_text('[node]\nid = "hq"\nrole = "boss"\ndatabase = "sqlite:///app.db"\n')
    assert_clean_error(mailsync("status", cwd=hq, ok=False), "role must be 'host' or 'remote'")
    cfg.write_text('[node]\nid = "hq"\nrole = "host"\n')
    assert_clean_error(mailsync("status", cwd=hq, ok=False), "missing setting 'database'")
    cfg.write_text(
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///missing/dir/x.db"\n'
        '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:m"\nreceive = "maildir:m"\n'
    )
    assert_clean_error(mailsync("status", cwd=hq, ok=False), "no database file at")
    # a mistyped path: refused (exit 3), not a new empty node
    cfg.write_text(
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///app.dbb"\n'
        '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:m"\nreceive = "maildir:m"\n'
    )
    proc = mailsync("sync", cwd=hq, ok=False)
    assert_clean_error(proc, "no database file at", "app.dbb")
    assert "mistyped path" in proc.stderr
    assert proc.returncode == 3 and not (hq / "app.dbb").exists()
    # an application database no node was made for: not taken over silently
    sqlite3.connect(hq / "erp.db").execute("CREATE TABLE t (id INTEGER PRIMARY KEY)").close()
    cfg.write_text(
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///erp.db"\n'
        '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:m"\nreceive = "maildir:m"\n'
    )
    proc = mailsync("sync", cwd=hq, ok=False)
    assert_clean_error(proc, "is not a mailsync node")
    assert "mailsync init host" in proc.stderr and proc.returncode == 3
    with sqlite3.connect(hq / "erp.db") as erp:
        names = [r[0] for r in erp.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert names == ["t"]
    cfg.write_text(
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "nosuchdb://x"\n'
        '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:m"\nreceive = "maildir:m"\n'
    )
    assert_clean_error(mailsync("status", cwd=hq, ok=False), "nosuchdb")


def test_init_refuses_and_leaves_nothing_half_written(site: Path) -> None:
    hq = site / "hq"
    proc = mailsync(
        "init",
        "host",
        "--id",
        "hq",
        "--db",
        "sqlite:///no/such/dir.db",
        "--address",
        "hq@x.test",
        cwd=hq,
        ok=False,
    )
    assert_clean_error(proc, "cannot open the database")
    assert not (hq / "mailsync.toml").exists()
    assert [p.name for p in hq.iterdir()] == ["app.db"]
    # a provider's two URLs and the password's source, checked before writing
    base = ("init", "host", "--id", "hq", "--db", "sqlite:///app.db", "--address", "hq@x.test")
    wrong = mailsync(*base, "--send", "imaps://hq%40x.test@mail.x.test", cwd=hq, ok=False)
    assert_clean_error(wrong, "'imaps' cannot send")
    assert wrong.returncode == 2 and not (hq / "mailsync.toml").exists()
    mailsync(
        *base,
        "--send",
        "smtp+starttls://hq%40x.test@mail.x.test:587",
        "--receive",
        "imaps://hq%40x.test@mail.x.test",
        "--password-env",
        "HQ_MAIL_PW",
        cwd=hq,
    )
    written = (hq / "mailsync.toml").read_text()
    assert 'send = "smtp+starttls://hq%40x.test@mail.x.test:587"' in written
    assert 'receive = "imaps://hq%40x.test@mail.x.test"' in written
    assert 'password_env = "HQ_MAIL_PW"' in written
    (hq / "mailsync.toml").unlink()
    init_host(hq)
    again = mailsync(
        "init",
        "host",
        "--id",
        "hq",
        "--db",
        "sqlite:///app.db",
        "--address",
        "hq@x.test",
        cwd=hq,
        ok=False,
    )
    assert_clean_error(again, "already exists")
    other = mailsync(
        "--config",
        "other.toml",
        "init",
        "host",
        "--id",
        "hq2",
        "--db",
        "sqlite:///app.db",
        "--address",
        "hq2@x.test",
        cwd=hq,
        ok=False,
    )
    assert_clean_error(other, "already belongs to node 'hq'")


def test_number_ranges_through_the_cli(site: Path) -> None:
    init_both(site)
    hq, koeln = site / "hq", site / "koeln"
    enroll(site)
    out = mailsync(
        "range", "add", "custno", "--start", "100", "--end", "999", "--block", "5", cwd=hq
    )
    assert "range custno 100-999, blocks of 5" in out.stdout
    for args, needle in (
        (("custno", "--start", "1", "--end", "9"), "exists already"),
        (("bad", "--start", "9", "--end", "1"), "make no range"),
        (("named", "--start", "1", "--end", "99", "--bind", "customers.name"), "NOT NULL"),
    ):
        assert_clean_error(mailsync("range", "add", *args, cwd=hq, ok=False), needle)
    mailsync("sync", cwd=hq)
    mailsync("sync", cwd=koeln)
    assert mailsync("number", "next", "custno", cwd=koeln).stdout.strip() == "100"
    assert "range custno: block 100-104: 1 used, 4 left" in mailsync("status", cwd=koeln).stdout
    assert mailsync("number", "next", "custno", cwd=hq).stdout.strip() == "105"
    shown = mailsync("range", "show", "custno", cwd=hq).stdout
    assert "koeln" in shown and "100-104" in shown and "hq" in shown
    assert "custno" in mailsync("range", "list", cwd=hq).stdout
    assert_clean_error(mailsync("range", "remove", "custno", cwd=hq, ok=False), "still live")
    bad = ("inv", "--start", "1", "--end", "99", "--format", "R-{x}-{n}")
    assert_clean_error(mailsync("range", "add", *bad, cwd=hq, ok=False), "not '{'")
    fmt = ("inv", "--start", "1", "--end", "999999", "--format", "R-{year}-{n:06}")
    assert re.search(r"numbers like R-\d{4}-000001", mailsync("range", "add", *fmt, cwd=hq).stdout)
    assert re.fullmatch(r"R-\d{4}-000001\n", mailsync("number", "next", "inv", cwd=hq).stdout)
    assert "(R-{year}-{n:06})" in mailsync("range", "list", cwd=hq).stdout
    proc = mailsync("number", "next", "nope", cwd=koeln, ok=False)
    assert_clean_error(proc, "no number range 'nope'")
    assert proc.returncode == 6
    assert "blocks of 20 for koeln" in (
        mailsync("range", "set-block", "custno", "20", "--station", "koeln", cwd=hq).stdout
    )
    assert (
        "1 lease(s)" in mailsync("range", "release", "custno", "--station", "koeln", cwd=hq).stdout
    )


def test_schedule_log_and_json_through_the_cli(site: Path) -> None:
    import json

    init_both(site)
    hq = site / "hq"
    out = mailsync(
        "schedule", "--every", "15m", "--between", "22:00-02:00", "--days", "fri", cwd=hq
    ).stdout
    assert "every 15m between 22:00-02:00 on fri" in out
    runs = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert len(runs) == 5 and set(runs) <= {"Fri", "Sat"}
    # a schedule tried on the command line needs no node (the example)
    bare = site / "nowhere"
    bare.mkdir()
    tried = mailsync(
        "schedule", "--every", "45m", "--between", "22:00-02:00", "--days", "mon-fri", cwd=bare
    ).stdout
    assert "every 45m between 22:00-02:00 on mon,tue,wed,thu,fri" in tried
    assert len([line for line in tried.splitlines() if line.startswith("  ")]) == 5
    none = mailsync("schedule", cwd=hq, ok=False)
    assert "add [[schedule]] to the config" in none.stdout and none.returncode == 1
    assert_clean_error(mailsync("serve", cwd=hq, ok=False), "no [[schedule]] to serve")
    assert_clean_error(mailsync("schedule", "--every", "soon", cwd=hq, ok=False), "not an interval")
    assert "not configured (no [[schedule]];" in mailsync("status", cwd=hq).stdout
    config = hq / "mailsync.toml"
    config.write_text(config.read_text() + '\n[[schedule]]\nevery = "1h"\ndays = "mon-fri"\n')
    assert "every 1h on mon,tue,wed,thu,fri" in mailsync("schedule", cwd=hq).stdout
    assert "service: stopped" in mailsync("status", cwd=hq).stdout
    mailsync("sync", cwd=hq)
    synced = json.loads(mailsync("sync", "--json", cwd=hq).stdout)
    assert synced["errors"] == [] and synced["received"] == 0
    status = json.loads(mailsync("status", "--json", cwd=hq).stdout)
    assert status["node"]["node_id"] == "hq" and status["service"]["configured"] is True
    # an idle cycle writes nothing (issue 17); an admin change is logged
    key = mailsync("keys", "show", cwd=site / "koeln").stdout.splitlines()[1]
    mailsync(
        "station",
        "add",
        "bonn",
        "--email",
        "bonn@x.test",
        "--key",
        key,
        "--bundle",
        str(site / "bonn.bundle"),
        cwd=hq,
    )
    entries = json.loads(mailsync("log", "--json", "--since", "1h", cwd=hq).stdout)
    assert not any(e["message"].startswith("sync cycle") for e in entries), entries
    assert any(e["message"].startswith("station bonn <bonn@x.test> added") for e in entries)
    assert "station bonn" in mailsync("log", cwd=hq).stdout
    assert_clean_error(mailsync("log", "--since", "yesterday", cwd=hq, ok=False), "--since")
    assert_clean_error(mailsync("log", "--level", "loud", cwd=hq, ok=False), "--level")


def test_station_commands_on_a_remote_are_refused(site: Path) -> None:
    init_both(site)
    proc = mailsync("station", "add", "x", "--email", "x@x.test", cwd=site / "koeln", ok=False)
    assert_clean_error(proc, "is a remote")


def test_every_command_has_help(site: Path) -> None:
    for args in (
        (),
        ("init",),
        ("sync",),
        ("status",),
        ("demo",),
        ("station",),
        ("station", "add"),
        ("station", "list"),
        ("station", "show"),
        ("station", "remove"),
        ("table",),
        ("table", "add"),
        ("table", "list"),
        ("table", "remove"),
        ("join",),
        ("keys",),
        ("keys", "show"),
        ("keys", "rotate"),
        ("inspect",),
        ("mailbox", "test"),
        ("errors",),
        ("errors", "list"),
        ("errors", "retry"),
        ("errors", "drop"),
        ("range",),
        ("range", "add"),
        ("range", "list"),
        ("range", "show"),
        ("range", "set-block"),
        ("range", "release"),
        ("range", "remove"),
        ("number", "next"),
        ("serve",),
        ("schedule",),
        ("log",),
        ("verify",),
    ):
        out = mailsync(*args, "--help", cwd=site).stdout
        assert "Usage" in out, args


def test_sealed_bundle_enrollment_and_inspect(site: Path) -> None:
    """The second way: the host makes the station's keys and seals them."""
    init_both(site)
    hq, koeln = site / "hq", site / "koeln"
    out = mailsync("station", "add", "koeln", "--email", "koeln@x.test", cwd=hq).stdout
    passphrase = next(line for line in out.splitlines() if line.startswith("passphrase:")).split()[
        1
    ]
    bundle = hq / "koeln.bundle"
    assert (bundle.stat().st_mode & 0o077) == 0
    assert "x25519" not in bundle.read_text()  # the private keys are sealed
    wrong = mailsync("join", str(bundle), cwd=koeln, ok=False, env={"MAILSYNC_PASSPHRASE": "guess"})
    assert_clean_error(wrong, "wrong passphrase")
    no_pass = mailsync("join", str(bundle), cwd=koeln, ok=False)
    assert_clean_error(no_pass, "is sealed")
    (site / "pass.txt").write_text(passphrase + "\n")
    mailsync("join", str(bundle), "--passphrase-file", str(site / "pass.txt"), cwd=koeln)
    mailsync("table", "add", "customers", cwd=hq)
    mailsync("sync", cwd=hq)
    (message,) = (site / "mail" / "koeln@x.test" / "new").iterdir()
    raw = message.read_bytes()
    assert b"customers" not in raw and "Müller".encode() not in raw
    shown = mailsync("inspect", str(message), cwd=koeln).stdout
    assert "hq → koeln  #1" in shown and "signature: yes" in shown and "opened: yes" in shown
    assert "customers" in shown and "compression" in shown
    other = mailsync("inspect", str(message), cwd=hq, ok=False).stdout
    assert "sealed for koeln, not for this node" in other
    assert "applied 1 changeset(s)" in mailsync("sync", cwd=koeln).stdout


def test_key_file_readable_by_others_is_refused(site: Path) -> None:
    init_both(site)
    key = site / "hq" / "mailsync.key"
    assert (key.stat().st_mode & 0o777) == 0o600
    key.chmod(0o644)
    assert_clean_error(mailsync("status", cwd=site / "hq", ok=False), "can be read by others")
    key.chmod(0o600)
    mailsync("status", cwd=site / "hq")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_key_file_owned_by_another_user_is_refused(site: Path) -> None:
    init_both(site)
    key = site / "hq" / "mailsync.key"
    os.chown(key, 65534, 65534)  # nobody's, still 0600
    proc = mailsync("status", cwd=site / "hq", ok=False)
    assert_clean_error(proc, "is owned by uid 65534, not by the user running mailsync")
    assert "hint: run mailsync as the key file's owner" in proc.stderr
    os.chown(key, os.geteuid(), os.getegid())
    mailsync("status", cwd=site / "hq")


def test_a_key_file_reached_through_a_symbolic_link_is_refused(site: Path) -> None:
    """Refused, not followed: a link beside the config points at keys somebody chose."""
    init_both(site)
    key = site / "hq" / "mailsync.key"
    real = site / "hq-keys" / "mailsync.key"
    real.parent.mkdir()
    key.rename(real)
    key.symlink_to(real)  # the target is ours and 0600: still refused
    assert_clean_error(mailsync("status", cwd=site / "hq", ok=False), "is a symbolic link")
    key.unlink()
    real.rename(key)
    mailsync("status", cwd=site / "hq")


def test_join_refuses_a_bundle_for_another_station(site: Path) -> None:
    init_both(site)
    key = mailsync("keys", "show", cwd=site / "koeln").stdout.splitlines()[1]
    mailsync("station", "add", "berlin", "--email", "berlin@x.test", "--key", key, cwd=site / "hq")
    proc = mailsync("join", str(site / "hq" / "berlin.bundle"), cwd=site / "koeln", ok=False)
    assert_clean_error(proc, "the bundle is for station 'berlin'")
    assert_clean_error(
        mailsync("join", str(site / "nope.bundle"), cwd=site / "koeln", ok=False), "no bundle at"
    )
    assert_clean_error(
        mailsync(
            "station",
            "add",
            "x",
            "--email",
            "x@x.test",
            "--key",
            "msk1:AAAA",
            cwd=site / "hq",
            ok=False,
        ),
        "damaged",
    )


def test_ctrl_c_says_nothing_is_lost_and_the_next_sync_finishes(site: Path) -> None:
    """A Ctrl-C mid-sync (SIGINT after the apply committed) and during
    start-up: one line, exit 130, no traceback; the next sync loses nothing."""
    init_both(site)
    hq, koeln = site / "hq", site / "koeln"
    enroll(site)
    mailsync("table", "add", "customers", cwd=hq)
    mailsync("sync", cwd=hq)
    for point in ("start:int", "after-apply:int"):
        proc = mailsync("sync", cwd=koeln, ok=False, env={"MAILSYNC_FAULT": point})
        assert proc.returncode == 130, (point, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "interrupted; nothing lost — run the command again"
        ], proc.stderr
    mailsync("sync", cwd=koeln)
    with sqlite3.connect(koeln / "app.db") as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (1,)
