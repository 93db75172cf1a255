"""Installed for real (issue 20, item 1): the wheel `make dist` builds goes
into a fresh virtual environment — no checkout on its path — and runs:
`mailsync --version` names it, and `mailsync demo` syncs a host and two
stations from it alone."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    wheels = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("mailsync-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    work = tmp_path / "elsewhere"  # not the checkout: only the installed package is found
    work.mkdir()
    shown = subprocess.run(
        [str(bin_dir / "mailsync"), "--version"],
        capture_output=True,
        text=True,
        cwd=work,
        env=clean,
        timeout=60,
    )
    assert shown.returncode == 0 and shown.stdout.strip() == f"mailsync {version}", shown
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import mailsync; print(mailsync.__file__)"],
        capture_output=True,
        text=True,
        cwd=work,
        env=clean,
        timeout=60,
    )
    assert str(env_dir) in where.stdout, where.stdout
    demo = subprocess.run(
        [str(bin_dir / "mailsync"), "demo", str(work / "demo")],
        capture_output=True,
        text=True,
        cwd=work,
        env=clean,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "Traceback" not in demo.stderr
