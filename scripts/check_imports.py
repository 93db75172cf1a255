#!/usr/bin/env python3
"""Import circles and layering rules inside the ``mailsync`` package.

Every module under ``mailsync/`` is parsed (never imported) and each import
of another module of the package becomes an edge: ``import mailsync.x``,
``from mailsync.x import y`` (an edge to ``mailsync.x.y`` when that is a
submodule, else to ``mailsync.x``), relative imports, and ``from ... import *``.
Nothing is exempt: an import inside a function is still a circle (it only
moves the failure to a later moment), and so is one under
``if TYPE_CHECKING:`` (the two modules still cannot be understood, typed or
split apart one without the other). Importing ``mailsync.x.y`` also runs the
``__init__`` of ``mailsync.x``; that implicit edge is not counted, or every
package whose ``__init__`` gathers its submodules would circle with them.

A circle is a strongly connected component of that graph (Tarjan). Each is
printed as closed paths, one line per import edge that takes part in it (the
shortest circle through that edge, duplicates dropped), so every import that
could be cut to break it appears in some line::

    mailsync.db -> mailsync.dialects -> mailsync.db

Layering rules (``RULES`` below) name who may not import what; a rule whose
modules do not exist (yet) passes.

Exit status: 0 when there are neither circles nor rule violations (a one-line
summary is printed), 1 otherwise. ``--verbose`` adds where each import is.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: The package checked by default: ``mailsync/`` next to ``scripts/``.
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "mailsync"


@dataclass(frozen=True)
class Rule:
    """Modules matching ``importers`` must not import modules matching
    ``forbidden``, except the importers listed in ``allowed``.

    A pattern ``a.b`` matches ``a.b`` itself and everything under it.
    """

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    why: str = ""


#: The layering of the package (docs/ARCHITECTURE.md). A rule whose
#: modules do not exist passes, so a rule may be written before its package.
RULES: tuple[Rule, ...] = (
    Rule(
        "wire-is-a-leaf",
        importers=("mailsync.wire",),
        forbidden=("mailsync.store", "mailsync.cycle", "mailsync.node"),
        why="the wire format is read and written without a database or a cycle",
    ),
    Rule(
        "cycle-below-node",
        importers=("mailsync.cycle",),
        forbidden=("mailsync.node",),
        why="the node runs the cycle steps; the steps do not reach back into the node",
    ),
    Rule(
        "cli-on-top",
        importers=("mailsync",),
        forbidden=("mailsync.cli",),
        allowed=("mailsync.__main__", "mailsync.entry", "mailsync.cli"),
        why="the command line is a thin layer over the library, which never needs it",
    ),
    Rule(
        "tools-beside-the-sync-path",
        importers=("mailsync",),
        forbidden=("mailsync.tools",),
        allowed=("mailsync.cli", "mailsync.tools"),
        why="the demo, the sample data, inspect and the mailbox check are run by hand",
    ),
    Rule(
        "store-below-the-cycle",
        importers=("mailsync.store",),
        forbidden=("mailsync.cycle", "mailsync.link", "mailsync.node", "mailsync.wire"),
        why="state is kept without knowing links, mail or the cycle",
    ),
)


def matches(module: str, pattern: str) -> bool:
    return module == pattern or module.startswith(pattern + ".")


@dataclass(frozen=True)
class Import:
    """One edge of the graph: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int


@dataclass
class Report:
    #: module name → its file
    modules: dict[str, Path]
    imports: list[Import]
    #: each circle as a closed path: first module == last module
    circles: list[list[str]] = field(default_factory=list)
    #: the strongly connected components of more than one module
    components: list[list[str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.circles and not self.violations


# ------------------------------------------------------------------ parsing


def find_modules(root: Path) -> dict[str, Path]:
    """Module name → file, for every ``.py`` under the package directory ``root``."""
    package = root.name
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported dotted name lands in: itself if a module, else
    its longest prefix that is one (``mailsync.x.attr`` → ``mailsync.x``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """The intra-package imports anywhere in one module's source."""
    package = module.split(".")[0]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def add(name: str, line: int) -> None:
        if not matches(name, package):
            return
        target = _resolve(name, known)
        if target is not None and target != module:
            found.append(Import(module, target, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                up = node.level - 1
                if up > len(here) - 1:
                    continue  # beyond the top of the package: not ours
                base = ".".join(here[: len(here) - up])
                base = f"{base}.{node.module}" if node.module else base
            else:
                if node.module is None:
                    continue
                base = node.module
            for alias in node.names:
                if alias.name != "*" and f"{base}.{alias.name}" in known:
                    add(f"{base}.{alias.name}", node.lineno)  # a submodule
                else:
                    add(base, node.lineno)
    return found


# -------------------------------------------------------------------- graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = []
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        work.append((start, sorted(graph[start])))
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_path(
    graph: dict[str, set[str]], start: str, goal: str, inside: set[str]
) -> list[str]:
    """Breadth-first, staying ``inside`` one component (where a path always exists)."""
    came: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for nxt in sorted(graph[node] & inside):
            if nxt not in came:
                came[nxt] = node
                queue.append(nxt)
    path = [goal]
    while (prev := came[path[-1]]) is not None:
        path.append(prev)
    return path[::-1]


def circles_in(graph: dict[str, set[str]], component: list[str]) -> list[list[str]]:
    """For every import edge inside ``component``, the shortest circle through
    it; rotated to start at its smallest module, duplicates dropped."""
    inside = set(component)
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for source in component:
        for target in sorted(graph[source] & inside):
            loop = [source, *_shortest_path(graph, target, source, inside)]
            ring = loop[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            if tuple(ring) not in seen:
                seen.add(tuple(ring))
                out.append([*ring, ring[0]])
    return sorted(out, key=lambda c: (len(c), c))


def violations_of(imports: Iterable[Import], rules: Iterable[Rule]) -> list[str]:
    out = []
    for rule in rules:
        for imp in imports:
            if (
                any(matches(imp.source, p) for p in rule.importers)
                and not any(matches(imp.source, p) for p in rule.allowed)
                and any(matches(imp.target, p) for p in rule.forbidden)
            ):
                out.append(
                    f"{rule.name}: {imp.source} imports {imp.target} (line {imp.line})"
                    + (f" — {rule.why}" if rule.why else "")
                )
    return out


def check(root: Path = DEFAULT_ROOT, rules: Iterable[Rule] = RULES) -> Report:
    """Parse the package at ``root`` and find its circles and rule violations."""
    known = find_modules(root)
    imports = sorted(
        {i for module, path in known.items() for i in imports_of(module, path, known)},
        key=lambda i: (i.source, i.target, i.line),
    )
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        graph[imp.source].add(imp.target)
    report = Report(modules=known, imports=imports)
    for component in sorted(strongly_connected(graph)):
        if len(component) > 1:
            report.components.append(component)
            report.circles += circles_in(graph, component)
    report.violations = violations_of(imports, rules)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT, help="package dir")
    parser.add_argument("--verbose", "-v", action="store_true", help="where each import is")
    args = parser.parse_args(argv)
    report = check(args.root)
    where = {(i.source, i.target): i.line for i in reversed(report.imports)}
    for circle in report.circles:
        print(" -> ".join(circle))
        if args.verbose:
            for a, b in itertools.pairwise(circle):
                print(f"    {shown(report.modules[a])}:{where[a, b]}: imports {b}")
    for line in report.violations:
        print(line)
    if not report.ok:
        print(
            f"{len(report.circles)} circle(s) in {len(report.components)} component(s), "
            f"{len(report.violations)} rule violation(s)",
            file=sys.stderr,
        )
        return 1
    print(
        f"no import circles, no layering violations: {len(report.modules)} modules, "
        f"{len(report.imports)} intra-package imports, {len(RULES)} rules"
    )
    return 0


def shown(path: Path) -> str:
    """A file, relative to the current directory where possible."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
