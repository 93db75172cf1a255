"""`mailsync demo`, as `make demo` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailsync.tools.demo import run_demo

#: the package under test, where it is not the installed one (a worktree)
_PATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_demo_converges_and_can_run_again(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", lines.append, customers=40, invoices=60)
    assert result.agree
    assert {t.rows for t in result.checksums["koeln"].values()} and result.checksums["hq"][
        "customers"
    ].rows == 41  # the station's new customer reached the host
    assert result.checksums["hq"]["invoices"].rows == 61  # and its invoice
    # numbered offline from the lease that came with the initial load
    (said,) = [line for line in lines if "koeln (offline): customer K-" in line]
    number = int(said.split("customer K-")[1].split()[0])
    first, last = (int(n) for n in said.split("(customers ")[1].rstrip(")").split("-"))
    assert first <= number <= last and last - first + 1 == 50
    for node in ("hq", "koeln", "berlin"):
        assert (tmp_path / "demo" / node / "mailsync.toml").exists()
    assert (tmp_path / "demo" / "mail" / "koeln@demo.example" / ".Processed").is_dir()
    assert run_demo(tmp_path / "demo", lines.append, customers=10, invoices=10).agree


def test_demo_command_prints_agreeing_checksums(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mailsync", "demo", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120", **_PATH},
    )
    assert proc.returncode == 0, proc.stderr
    assert "all three databases agree" in proc.stdout
    assert proc.stdout.count(" yes") == 4


def test_demo_refuses_a_folder_with_other_content(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "mailsync", "demo", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
