"""The deployment kits' example configs load through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsync.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("kit", "role"), [("host", "host"), ("remote", "remote")])
def test_example_config_loads(kit: str, role: str) -> None:
    cfg = load_config(ROOT / kit / "mailsync.toml")
    assert cfg.role == role
    assert cfg.mailbox.address.endswith("@firma.example")
    assert cfg.key_grace_days == 14
    assert cfg.mailbox.send.startswith("smtp+starttls://") and cfg.mailbox.secret.env


@pytest.mark.parametrize("kit", ["host", "remote"])
def test_kit_has_a_guide(kit: str) -> None:
    guide = (ROOT / kit / "README.md").read_text(encoding="utf-8")
    assert "mailsync" in guide and "mailsync.toml" in guide
