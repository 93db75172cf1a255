"""The package's import graph: no circles, and the layers import downwards.

``scripts/check_imports.py`` (``make imports``) parses the modules without
importing them. Here it runs on the real package, and on small synthetic
packages that show it finds what it is meant to find.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_imports.py"
PACKAGE = SCRIPT.parent.parent / "mailsync"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


checker = _load()


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package under ``root`` from {relative path: source}; returns its directory."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / next(iter(files)).split("/")[0]


def test_the_package_has_no_import_circles() -> None:
    report = checker.check(PACKAGE)
    assert not report.circles, "\n".join(" -> ".join(c) for c in report.circles)


def test_the_package_keeps_its_layering_rules() -> None:
    report = checker.check(PACKAGE)
    assert len(report.modules) > 40 and len(report.imports) > 100  # it did read the package
    assert not report.violations, "\n".join(report.violations)


def test_only_the_link_module_writes_the_links_table() -> None:
    """The link's state machine has one owner (docs/ARCHITECTURE.md): an
    insert, update or delete of ``mailsync_links`` anywhere else is a
    transition that escaped it."""
    writes = re.compile(
        r"(update|insert|delete)\(\s*links\b|\blinks\.(update|insert|delete)\(", re.S
    )
    found = [
        f"{path.relative_to(PACKAGE.parent)}: {m.group(0)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "link.py" or path.parent != PACKAGE
        for m in writes.finditer(path.read_text())
    ]
    assert not found, found
    # and the pattern does find one
    assert writes.search("conn.execute(update(links).where(links.c.peer == p))")


def test_no_module_outgrows_its_concept() -> None:
    """Split before ~600 lines (STYLE.md): a module that long holds more
    than one concept."""
    sizes = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert all(n <= 600 for n in sizes.values()), {
        str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > 600
    }


def test_a_direct_a_lazy_and_a_type_checking_circle_are_all_found(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # plain: a <-> b, one absolute, one dotted
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "import pkg.a\n",
            # lazy: c imports d inside a function, d imports c relatively
            "pkg/c.py": """
                def later():
                    from pkg.d import thing
                    return thing
            """,
            "pkg/d.py": "from . import c\nthing = 1\n",
            # typing only: e and f, in a subpackage, one relative from the parent
            "pkg/sub/__init__.py": "",
            "pkg/sub/e.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.sub.f import F
                class E: ...
            """,
            "pkg/sub/f.py": "from ..sub.e import E\nclass F(E): ...\n",
            # one way only, and outside imports: no circle
            "pkg/g.py": "import os\nimport pkg.a\nfrom pkg.sub.e import E\nfrom pkg import g2\n",
            "pkg/g2.py": "from json import dumps\n",
        },
    )
    report = checker.check(root, rules=())
    assert sorted(report.circles) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.c", "pkg.d", "pkg.c"],
        ["pkg.sub.e", "pkg.sub.f", "pkg.sub.e"],
    ]
    assert not report.violations
    edges = {(i.source, i.target) for i in report.imports}
    assert {("pkg.g", "pkg.a"), ("pkg.g", "pkg.sub.e"), ("pkg.g", "pkg.g2")} <= edges
    assert not any(t in ("os", "json") for _, t in edges)


def test_a_circle_through_three_modules_names_each_of_its_imports(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/x.py": "from pkg.y import Y\n",
            "pkg/y.py": "from pkg.z import Z\nfrom pkg import x\nY = 1\n",
            "pkg/z.py": "from pkg.x import X\nZ = 1\n",
        },
    )
    report = checker.check(root, rules=())
    assert report.components == [["pkg.x", "pkg.y", "pkg.z"]]
    assert sorted(report.circles) == [
        ["pkg.x", "pkg.y", "pkg.x"],
        ["pkg.x", "pkg.y", "pkg.z", "pkg.x"],
    ]


def test_the_layering_rules_catch_what_they_forbid_and_only_that(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "mailsync/__init__.py": "",
            "mailsync/__main__.py": "from mailsync.cli import main\n",
            "mailsync/cli/__init__.py": "from mailsync.cli import common\n",
            "mailsync/cli/common.py": "from mailsync.node import Node\n",
            "mailsync/node.py": "from mailsync.cycle import send\nimport mailsync.wire.codec\n",
            "mailsync/tools/__init__.py": "",
            "mailsync/tools/demo.py": "from mailsync.node import Node\n",
            "mailsync/cli/demo.py": "from mailsync.tools import demo\n",
            "mailsync/link.py": "from mailsync.tools.demo import run\n",
            "mailsync/wire/__init__.py": "",
            "mailsync/wire/codec.py": "from mailsync.store.outbox import put\n",
            "mailsync/store/__init__.py": "",
            "mailsync/store/outbox.py": "from mailsync.wire.codec import seal\n",
            "mailsync/cycle/__init__.py": "",
            "mailsync/cycle/send.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from mailsync.node import Node
            """,
            "mailsync/demo.py": """
                def run():
                    from mailsync.cli.common import console
            """,
        },
    )
    report = checker.check(root)
    assert [v.split(" (line")[0] for v in report.violations] == [
        "wire-is-a-leaf: mailsync.wire.codec imports mailsync.store.outbox",
        "cycle-below-node: mailsync.cycle.send imports mailsync.node",
        "cli-on-top: mailsync.demo imports mailsync.cli.common",
        "tools-beside-the-sync-path: mailsync.link imports mailsync.tools.demo",
        "store-below-the-cycle: mailsync.store.outbox imports mailsync.wire.codec",
    ]


def test_rules_about_modules_that_do_not_exist_yet_pass(tmp_path: Path) -> None:
    root = write_package(
        tmp_path, {"mailsync/__init__.py": "", "mailsync/node.py": "from mailsync import db\n"}
    )
    (root / "db.py").write_text("")
    report = checker.check(root)
    assert report.ok and not report.violations


def test_the_command_exits_1_with_one_line_per_circle_and_0_when_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    circular = write_package(
        tmp_path / "bad",
        {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "import pkg.a\n"},
    )
    assert checker.main([str(circular)]) == 1
    assert capsys.readouterr().out.splitlines() == ["pkg.a -> pkg.b -> pkg.a"]
    clean = write_package(
        tmp_path / "good", {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": ""}
    )
    assert checker.main([str(clean)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("no import circles") and "3 modules" in line
